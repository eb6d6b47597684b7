"""The candidate layouts for a world size: every combination of the axes and settings the
planner varies that eurotrain's own ``check_layout`` accepts.

Varied: tp (a divisor of the GPUs per node, so it stays on the node's links), cp (within a node,
only for sequences of 8K tokens or more), pp (up to 16 stages) with the 1F1B, interleaved 1F1B
(2 stages per rank) and, for dense models without activation checkpointing, the zero-bubble
ZBV and interleaved zero-bubble (2 stages per rank) schedules, dp_replicate (1, one replica per
node: HSDP, or every rank a replica without tp, cp or pp: DDP), for a mixture of experts ep
(the divisors of dp_shard that divide num_experts), the micro-batch (1, 2, 4, 8) and activation
checkpointing (none, selective, full), on the FSDP engine (which runs replicas-only layouts
through DDP) and, for dense models with data parallelism only, on DeepSpeed ZeRO-1, -2 and -3.
Everything else is the config's own (``parallel.zero_bucket_size`` among it). Left out, because
the memory model does not describe what the code then allocates (measured in docs/planner.md):
the zero-bubble schedules for a mixture of experts (not measured).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

from eurotrain.config import Config
from eurotrain.configtools import ConfigError, divisors
from eurotrain.parallel.checks import check_layout
from eurotrain.parallel.dims import ParallelDims
from eurotrain.plan import schedules

MICRO_BATCHES = (1, 2, 4, 8)
ZERO_STAGES = (1, 2, 3)
AC_MODES: tuple[Literal["none", "selective", "full"], ...] = ("none", "selective", "full")
MAX_PP = 16
CP_MIN_SEQ = 8192


@dataclass
class Candidate:
    cfg: Config
    """The config with this layout's settings."""
    dims: ParallelDims
    overrides: dict[str, Any]
    """The settings that differ from the config (dotted keys, as `eurotrain train` takes)."""


def _pipelines(num_layers: int, pp_options: list[int], dense: bool) -> Iterator[dict[str, Any]]:
    zero_bubble = dense and schedules.order_available()
    for pp in pp_options:
        if pp == 1:
            yield {"pp": 1}
        elif pp <= min(MAX_PP, num_layers):
            yield {"pp": pp, "pp_schedule": "1f1b", "pp_virtual_stages": 1}
            if 2 * pp <= num_layers:
                yield {"pp": pp, "pp_schedule": "interleaved_1f1b", "pp_virtual_stages": 2}
                if zero_bubble:
                    yield {"pp": pp, "pp_schedule": "zbv", "pp_virtual_stages": 1}
                    yield {"pp": pp, "pp_schedule": "interleaved_zb", "pp_virtual_stages": 2}


def _parallel_options(cfg: Config, world: int, gpus_per_node: int) -> Iterator[dict[str, Any]]:
    m, seq = cfg.model, cfg.data.seq_len
    nodes = world // gpus_per_node
    for tp in divisors(gpus_per_node):
        cps = [c for c in divisors(gpus_per_node // tp) if c == 1 or seq >= CP_MIN_SEQ]
        for cp in cps:
            rest = world // (tp * cp)
            for pipe in _pipelines(m.num_layers, divisors(rest), not m.moe.enabled):
                dp = rest // pipe["pp"]
                reps = [1] + ([nodes] if nodes > 1 and dp % nodes == 0 and dp > nodes else [])
                if dp > 1 and tp == cp == pipe["pp"] == 1 and dp not in reps:
                    reps.append(dp)  # replicas only: DDP (eurotrain/parallel/ddp.py)
                for rep in reps:
                    base = {"tp": tp, "cp": cp, **pipe, "dp_replicate": rep, "dp_shard": dp // rep}
                    for ep in _expert_options(cfg, dp // rep):
                        yield {**base, "ep": ep, "engine": "fsdp"}
                    if dp > 1 and rep == 1 and tp == cp == pipe["pp"] == 1 and not m.moe.enabled:
                        # DeepSpeed runs data parallelism only (check_layout)
                        for stage in ZERO_STAGES:
                            yield {**base, "ep": 1, "engine": "deepspeed", "zero_stage": stage}


def _expert_options(cfg: Config, dp_shard: int) -> list[int]:
    """Expert-parallel degrees: the divisors of dp_shard that divide the experts (ep is a
    sub-axis of dp_shard; each ep rank holds num_experts / ep); 1 for a dense model."""
    experts = cfg.model.moe.num_experts
    if not cfg.model.moe.enabled:
        return [1]
    return [e for e in divisors(dp_shard) if experts % e == 0]


def candidates(cfg: Config, world: int, gpus_per_node: int) -> tuple[list[Candidate], list[str]]:
    """The layouts ``check_layout`` accepts, and the distinct reasons it gave for the others."""
    out: list[Candidate] = []
    reasons: list[str] = []
    for par in _parallel_options(cfg, world, gpus_per_node):
        for micro in MICRO_BATCHES:
            for ac in AC_MODES:
                if ac != "none" and par.get("pp_schedule") in schedules.ZERO_BUBBLE:
                    continue  # their split backward and checkpointing exclude each other
                overrides = {f"parallel.{k}": v for k, v in par.items()}
                overrides["parallel.activation_checkpointing"] = ac
                overrides["train.micro_batch_size"] = micro
                if par["pp"] > 1 or par["engine"] == "deepspeed":  # it is FSDP2's (checks.py)
                    overrides["parallel.reduce_every_microbatch"] = False
                par_of = {
                    k.removeprefix("parallel."): v
                    for k, v in overrides.items()
                    if k.startswith("parallel.")
                }
                try:
                    c = replace(
                        cfg,
                        parallel=replace(cfg.parallel, **par_of),
                        train=replace(cfg.train, micro_batch_size=micro),
                    )
                    dims = check_layout(c, world, cuda=True)
                except ConfigError as e:
                    if str(e) not in reasons:
                        reasons.append(str(e))
                    continue
                out.append(Candidate(c, dims, _differing(cfg, overrides)))
    return out, reasons


def _differing(cfg: Config, overrides: dict[str, Any]) -> dict[str, Any]:
    """The overrides whose value differs from the config's (dp_shard always: the config's may
    be -1, which resolves differently on another world size)."""
    out = {}
    for key, value in overrides.items():
        section, name = key.split(".")
        if name == "dp_shard" or getattr(getattr(cfg, section), name) != value:
            out[key] = value
    return out
