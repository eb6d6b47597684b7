"""Memory of the multi-stage pipeline schedules (interleaved 1F1B, interleaved zero bubble, ZBV)
from the order in which PyTorch runs each rank's forwards (F), whole backwards (B) and, for the
zero-bubble schedules, input-gradient (I) and weight-gradient (W) halves of the backward
(docs/planner.md, "Multi-stage and zero-bubble schedules").

What these schedules keep, and when (torch.distributed.pipelining, PyTorch 2.13):

- A micro-batch's activations on a stage live from its F to its B, or to its W: I computes the
  stage's input gradients with the graph retained, so nothing is freed before W.
- I also keeps, until W, the gradient arriving at every weighted operation (each linear
  layer's output, each norm's scaled output, on the last stage the logits when the loss
  materialises them): W starts from them (``_backward.stage_backward_input``).
- These schedules run on ``_PipelineScheduleRuntime``, which waits for its sends only at the end
  of the step: every activation a stage sends to the next rank and every input gradient it
  sends back stays alive until then (the single-stage 1F1B and GPipe wait for each send at once).
  Between two stages on one rank (ZBV's turn) nothing is sent: the receiving stage keeps the
  tensor itself in place of its receive buffer (``set_local_fwd_input``), until the next step.

The peak is the largest sum over the rank's actions of what the earlier ones left alive and what
the running action allocates.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from torch.distributed.pipelining import schedules as torch_schedules

from eurotrain.models.config import ModelConfig
from eurotrain.plan.activations import Precision, Shape

SIMULATED = ("interleaved_1f1b", "interleaved_zb", "zbv")
"""The schedules whose memory is modelled from their order (the runtime-based ones)."""
ZERO_BUBBLE = ("interleaved_zb", "zbv")

Action = tuple[str, int, int]
"""(kind "F", "B", "I" or "W", stage, micro-batch)."""


class OrderUnavailable(RuntimeError):
    """This PyTorch computes its schedules' order differently from the one the planner reads."""


def order_available() -> bool:
    """Whether this PyTorch's schedules give their order as ``rank_order`` reads it."""
    try:
        rank_order("zbv", 2, 4, 2, 0)
        rank_order("interleaved_zb", 2, 4, 2, 0)
    except OrderUnavailable:
        return False
    return True


@functools.lru_cache(maxsize=4096)
def rank_order(
    schedule: str, pp: int, num_micro: int, stages_per_rank: int, rank: int
) -> tuple[Action, ...]:
    """The compute actions of pipeline rank ``rank`` in the order PyTorch's schedule class runs
    them: the class's own order computation, run on an instance without stages (it reads only
    the sizes). A PyTorch whose method or attributes differ gives OrderUnavailable."""
    try:
        s: Any
        if schedule == "zbv":
            s = object.__new__(torch_schedules.ScheduleZBVZeroBubble)
            s.num_stages = 2 * pp
        elif schedule in ("interleaved_1f1b", "interleaved_zb"):
            s = object.__new__(
                torch_schedules.ScheduleInterleaved1F1B
                if schedule == "interleaved_1f1b"
                else torch_schedules.ScheduleInterleavedZeroBubble
            )
            s.n_local_stages = stages_per_rank
            s.number_of_rounds = max(1, num_micro // pp)
            s.microbatches_per_round = num_micro // s.number_of_rounds
        else:
            raise ValueError(f"{schedule}: not a schedule the planner reads the order of")
        s.pp_group_size, s._n_microbatches = pp, num_micro
        kinds = {
            torch_schedules._ComputationType.FORWARD: "F",
            torch_schedules._ComputationType.FULL_BACKWARD: "B",
            torch_schedules._ComputationType.BACKWARD_INPUT: "I",
            torch_schedules._ComputationType.BACKWARD_WEIGHT: "W",
        }
        return tuple(
            (kinds[a.computation_type], a.stage_index, int(a.microbatch_index))
            for a in s._calculate_single_rank_operations(rank)
            if a is not None
        )
    except (AttributeError, TypeError, KeyError) as e:
        raise OrderUnavailable(
            f"this PyTorch's {schedule} schedule does not compute its order as the planner "
            f"reads it ({type(e).__name__}: {e})"
        ) from e


def stage_rank(schedule: str, pp: int, stage: int) -> int:
    """The pipeline rank holding ``stage``: round robin, or ZBV's V (eurotrain/parallel/pipeline.py
    stage_ids)."""
    if schedule == "zbv" and stage >= pp:
        return 2 * pp - 1 - stage
    return stage % pp


def block_weight_grad_inputs(m: ModelConfig, shape: Shape, prec: Precision) -> int:
    """Bytes of the gradients one dense block keeps from I to W: at the outputs of its two
    norms' weight products and of its seven linear layers (column-parallel outputs split by
    tp; the row-parallel ones whole before their reduce-scatter)."""
    assert m.head_dim is not None and m.num_kv_heads is not None
    t, c = shape.tokens, prec.compute
    qkv = (m.num_heads + 2 * m.num_kv_heads) * m.head_dim // shape.tp
    norms = 2 * shape.residual_rows * m.dim * prec.residual
    return norms + t * (qkv + m.dim + 2 * (m.ffn_dim // shape.tp) + m.dim) * c


def block_input_backward_temporary(m: ModelConfig, shape: Shape, prec: Precision) -> int:
    """A dense block's gradient temporary while I runs, besides those it keeps for W: the
    gradient at the SwiGLU product (w2's input); w1's and w3's outputs' are kept."""
    return shape.tokens * (m.ffn_dim // shape.tp) * prec.compute


def head_weight_grad_inputs(m: ModelConfig, shape: Shape, prec: Precision) -> int:
    """The last stage's: the final norm's, and the logits' where the loss materialises them (the
    fused loss computes its weight gradient in its forward and keeps nothing more)."""
    norm = shape.residual_rows * m.dim * prec.residual
    logits = 0 if shape.fused_loss else shape.tokens * (m.vocab_size // shape.tp) * prec.compute
    return norm + logits


@dataclass(frozen=True)
class StageBytes:
    """One micro-batch on one stage."""

    saved: int
    """Activations, from F to B or W (the stage's output is counted where it goes: a send, or the
    receive buffer of the next stage on this rank)."""
    forward: int
    """Temporaries while F runs (the loss's, on the last stage)."""
    backward: int
    """While B runs: the largest of this micro-batch's activations still alive plus the
    temporaries, over its blocks (and the loss's start on the last stage)."""
    kept_for_w: int = 0
    """Gradients at the weighted operations, from I to W."""
    input_backward: int = 0
    """Temporaries while I runs, on top of ``saved`` and ``kept_for_w`` (at I's end a block's
    gradient temporary; at its start, on the last stage, the loss's gradients if larger)."""
    sent_forward: int = 0
    """The stage's output, sent to the next rank: alive from F to the end of the step."""
    sent_backward: int = 0
    """The stage's input gradient, sent to the previous rank: from B or I to the step's end."""


@dataclass(frozen=True)
class Peak:
    activations: int
    """Saved activations of every stage and micro-batch alive at the peak."""
    sent: int
    """Sent outputs and input gradients not yet waited for."""
    kept_for_w: int
    """Gradients kept for W."""
    temporaries: int
    """Of the action running at the peak."""

    @property
    def total(self) -> int:
        return self.activations + self.sent + self.kept_for_w + self.temporaries


def peak(order: tuple[Action, ...], stages: dict[int, StageBytes], weight_temporaries: int) -> Peak:
    """The largest live total over ``order``: before each action what the earlier ones left,
    plus what the action itself holds while it runs."""
    saved = kept = sent = 0
    best, best_total = Peak(0, 0, 0, 0), -1
    for kind, stage, _ in order:
        b = stages[stage]
        if kind == "F":
            saved += b.saved
            sent += b.sent_forward
            now = (saved, sent, kept, b.forward)
        elif kind == "B":
            now = (saved, sent, kept, b.backward - b.saved)
            saved -= b.saved
            sent += b.sent_backward
        elif kind == "I":
            kept += b.kept_for_w
            now = (saved, sent, kept, b.input_backward)
            sent += b.sent_backward
        else:  # W: one parameter group's weight gradient at a time, then all of it is freed
            now = (saved, sent, kept, weight_temporaries)
            saved -= b.saved
            kept -= b.kept_for_w
        if sum(now) > best_total:
            best, best_total = Peak(*now), sum(now)
    return best


@functools.lru_cache(maxsize=1024)
def bubble(schedule: str, pp: int, num_micro: int, stages_per_rank: int, backward: float) -> float:
    """Idle time of the pipeline as a fraction of each rank's busy time, from running every
    rank's actions in PyTorch's order: a forward of a stage takes 1, its backward ``backward``
    (2, or 3 when the forward is recomputed), split evenly into I and W; a forward waits for
    the previous stage's, a backward (or I) for the next stage's, W for its own I; transfers
    take no time. The makespan over the busiest rank's work, minus one."""
    orders = [rank_order(schedule, pp, num_micro, stages_per_rank, r) for r in range(pp)]
    cost = {"F": 1.0, "B": backward, "I": backward / 2, "W": backward / 2}
    last = max(s for order in orders for _, s, _ in order)
    done: dict[tuple[str, int, int], float] = {}
    clock = [0.0] * pp
    at = [0] * pp
    left = sum(len(o) for o in orders)
    while left:
        moved = False
        for r, order in enumerate(orders):
            while at[r] < len(order):
                kind, s, mb = order[at[r]]
                if kind == "F":
                    need = ("F", s - 1, mb) if s > 0 else None
                elif kind == "W":
                    need = ("I", s, mb)
                elif s == last:
                    need = ("F", s, mb)
                else:  # B or I: the next stage's input gradient, from its B or its I
                    need = ("B", s + 1, mb) if ("B", s + 1, mb) in done else ("I", s + 1, mb)
                if need is not None and need not in done:
                    break
                start = max(clock[r], done[need] if need is not None else 0.0)
                clock[r] = done[(kind, s, mb)] = start + cost[kind]
                at[r] += 1
                left -= 1
                moved = True
        if not moved:
            raise OrderUnavailable(f"{schedule}: the ranks' orders wait on each other")
    busy = max(sum(cost[k] for k, _, _ in order) for order in orders)
    return max(clock) / busy - 1
