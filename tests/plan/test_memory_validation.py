"""The planner's memory model against what the real training step allocates (docs/planner.md):
for each layout, the predicted bytes of parameters, gradients, optimizer state, activations and
buffers at the step's peak are within +-10 % of the peak measured on CPU by the PyTorch
profiler's allocation events, on every rank of real gloo processes (tests/plan/memtrace.py);
the ``SINGLE`` cases run in each of those processes alone, as one-process runs."""

from __future__ import annotations

import pytest
from memcases import TINY_MOE, load, measure_cases
from multiproc import run_distributed

from eurotrain.parallel.checks import check_layout
from eurotrain.plan.memory import Setting, estimate_ranks

RANKS = 2
FSDP, TP = ["--parallel.dp_shard", "2"], ["--parallel.dp_shard", "1", "--parallel.tp", "2"]
PP = ["--parallel.dp_shard", "1", "--parallel.pp", "2", "--model.tie_embeddings", "false"]
CP = ["--parallel.dp_shard", "1", "--parallel.cp", "2"]
DDP = ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "1"]
FULL = ["--parallel.activation_checkpointing", "full"]
SELECTIVE = ["--parallel.activation_checkpointing", "selective"]
CASES = [
    FSDP,
    [*FSDP, *FULL],
    # gradient accumulation: FSDP keeps unsharded gradients until the last micro-batch
    [*FSDP, "--train.micro_batch_size", "4", *SELECTIVE],
    [*TP, *SELECTIVE],
    PP,
    [*PP, *FULL],
    # 16 micro-batches: the multi-stage schedules keep every send until the step's end
    [
        *PP,
        "--parallel.pp_schedule",
        "interleaved_1f1b",
        "--parallel.pp_virtual_stages",
        "2",
        "--train.micro_batch_size",
        "1",
    ],
    # the zero-bubble schedules: activations kept from F to W, weight-op gradients from I to W
    [*PP, "--parallel.pp_schedule", "zbv"],
    [*PP, "--parallel.pp_schedule", "interleaved_zb", "--parallel.pp_virtual_stages", "2"],
    CP,
    # replicas only (DDP), with accumulation: the gradients stay views into DDP's buckets
    [*DDP, "--train.micro_batch_size", "4"],
    # mixture of experts (tiny-moe: a dense first block, 8 experts top 2, a shared expert);
    # FSDP without AC, PP with full AC and one process with AC full were also within 5 % when
    # measured (docs/planner.md) and are left out of the suite for its time
    [TINY_MOE, *FSDP, *FULL],
    [TINY_MOE, *FSDP, *SELECTIVE],
    [TINY_MOE, *PP],
    # expert parallelism (ep 2 inside dp_shard 2) and the MoE under tensor parallelism
    [TINY_MOE, *FSDP, "--parallel.ep", "2", *FULL],
    [TINY_MOE, *TP, *SELECTIVE],
]
SINGLE = [
    # one process each (no mesh; every rank runs it alone): mixture of experts, 2 micro-batches
    [TINY_MOE],
    # bf16 asked for by name on a CPU: autocast, fp32 weights and a bf16 copy of each
    ["--train.mixed_precision", "bf16", "--model.tie_embeddings", "false"],
]


@pytest.fixture(scope="module")
def measured() -> list[list[dict[str, int]]]:
    """Bytes by rank and case, every case in one group of processes (reused)."""
    return run_distributed(measure_cases, RANKS, CASES, SINGLE, timeout=120)


def test_memory_prediction_matches_real_step(measured: list[list[dict[str, int]]]) -> None:
    failures = []
    for i, overrides in enumerate(CASES + SINGLE):
        world = RANKS if i < len(CASES) else 1
        cfg = load(overrides)
        dims = check_layout(cfg, world, cuda=False)
        predicted = estimate_ranks(cfg, dims, Setting(cuda=False))
        for rank in range(RANKS):
            # ranks are ordered pp outermost: rank r is pipeline rank r // (ranks // pp)
            est = predicted[rank // (RANKS // dims.pp) if world == RANKS else 0]
            peak = measured[rank][i]["peak"]
            ratio = est.model_bytes / peak
            if not 0.9 <= ratio <= 1.1:
                failures.append(
                    f"{overrides} rank {rank}: predicted {est.model_bytes} B, measured {peak} B "
                    f"({ratio:.3f})"
                )
    assert not failures, "\n".join(failures)


# DeepSpeed ZeRO, data parallel only. Each case runs in a fresh pair of processes: a ZeRO engine
# that is deleted is not freed (DeepSpeed keeps references to its parameters), so a later case
# in the same processes would carry its memory. Small buckets (parallel.zero_bucket_size), so
# that the states, gradients and activations, not one 5e8-element buffer, decide the peak; a
# model with dim 256, whose MLP weights ZeRO-3 partitions (the smaller tensors stay whole).
ZERO = ["--parallel.engine", "deepspeed", "--parallel.dp_shard", "2",
        "--parallel.zero_bucket_size", "10000"]  # fmt: skip
DIM256 = ["--model.dim", "256", "--model.ffn_dim", "768"]
ZERO_CASES = [
    # ZeRO-1 reduces after the backward: the gradients pile up as the backward makes them
    [*DIM256, *ZERO, "--parallel.zero_stage", "1", *FULL],
    [*ZERO, "--parallel.zero_stage", "2", "--train.micro_batch_size", "4"],
    # ZeRO-3 gathers the parameters twice over in forward, once in the blocks' backward
    [*DIM256, *ZERO, "--parallel.zero_stage", "3", "--train.micro_batch_size", "2", *SELECTIVE],
]


@pytest.fixture(scope="module")
def measured_zero() -> list[list[dict[str, int]]]:
    pytest.importorskip("deepspeed")
    return [run_distributed(measure_cases, RANKS, [case], timeout=120) for case in ZERO_CASES]


def test_deepspeed_memory_prediction_matches_real_step(
    measured_zero: list[list[list[dict[str, int]]]],
) -> None:
    """The prediction is the busiest rank's: ZeRO-2's ranks differ (the rank whose gradient
    partition fills first holds it through more of the backward)."""
    failures = []
    for overrides, by_rank in zip(ZERO_CASES, measured_zero):
        cfg = load(overrides)
        [est] = estimate_ranks(cfg, check_layout(cfg, RANKS, cuda=False), Setting(cuda=False))
        peak = max(rank[0]["peak"] for rank in by_rank)
        ratio = est.model_bytes / peak
        if not 0.9 <= ratio <= 1.1:
            failures.append(f"{overrides}: predicted {est.model_bytes} B, measured {peak} B "
                            f"({ratio:.3f})")  # fmt: skip
    assert not failures, "\n".join(failures)
