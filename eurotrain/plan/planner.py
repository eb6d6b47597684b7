"""The planner: every candidate layout for each node count, its memory per GPU against the
device, its speed, and the ranking; what would fit when nothing does."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from eurotrain.config import Config
from eurotrain.configtools import ConfigError
from eurotrain.plan.hardware import Hardware
from eurotrain.plan.layouts import Candidate, candidates
from eurotrain.plan.memory import GIB, MemoryEstimate, Setting, estimate, fsdp_accumulates
from eurotrain.plan.speed import StepTime, Throughput, step_time, throughput

MAX_SUGGESTED_NODES = 1024


@dataclass
class Option:
    nodes: int
    candidate: Candidate
    memory: MemoryEstimate
    fits: bool
    time: StepTime
    speed: Throughput

    def layout(self) -> str:
        """A short description: the axes > 1, schedule, micro-batch, checkpointing, engine."""
        d, p = self.candidate.dims, self.candidate.cfg.parallel
        axes = [f"{k}={v}" for k, v in d.degrees().items() if v > 1]
        if p.ep > 1:
            axes.append(f"ep={p.ep}")
        if d.pp > 1:
            axes.append(
                p.pp_schedule + (f"x{p.pp_virtual_stages}" if p.pp_virtual_stages > 1 else "")
            )
        axes.append(f"mb={self.candidate.cfg.train.micro_batch_size}")
        axes.append(f"ac={p.activation_checkpointing}")
        if p.reduce_every_microbatch and fsdp_accumulates(self.candidate.cfg, d):
            axes.append("rs=every")
        if p.engine == "deepspeed":
            axes.append(f"zero{p.zero_stage}")
        return " ".join(axes)


@dataclass
class Request:
    cfg: Config
    hw: Hardware
    nodes: list[int]
    steps: int
    max_memory_fraction: float
    overrides: list[str]
    """--seq-len / --global-batch as config overrides."""

    @property
    def usable_bytes(self) -> float:
        return self.hw.memory_gib * GIB * self.max_memory_fraction


def _reducing_every(c: Candidate) -> Candidate:
    p = replace(c.cfg.parallel, reduce_every_microbatch=True)
    overrides = {**c.overrides, "parallel.reduce_every_microbatch": True}
    return Candidate(replace(c.cfg, parallel=p), c.dims, overrides)


def evaluate(req: Request, nodes: int) -> tuple[list[Option], list[str]]:
    """Every layout ``check_layout`` accepts on ``nodes`` nodes, fitting or not. An FSDP layout
    that accumulates gradients and does not fit is tried again reducing them after every
    micro-batch (only sharded gradients kept): more communication for less memory, so only
    where the memory is needed."""
    world = nodes * req.hw.gpus_per_node
    cands, reasons = candidates(req.cfg, world, req.hw.gpus_per_node)
    options = []

    def option(c: Candidate) -> Option:
        mem = estimate(c.cfg, c.dims, Setting(cuda=True))
        st = step_time(c.cfg, c.dims, req.hw)
        speed = throughput(st, c.dims, req.hw, req.steps)
        return Option(nodes, c, mem, mem.total <= req.usable_bytes, st, speed)

    for c in cands:
        o = option(c)
        if (
            not o.fits
            and not c.cfg.parallel.reduce_every_microbatch
            and fsdp_accumulates(c.cfg, c.dims)
        ):
            o = option(_reducing_every(c))
        options.append(o)
    return options, reasons


DEEPSPEED_MARGIN = 0.99
"""A DeepSpeed layout ranks above an FSDP one only when predicted more than 1 % faster: the model
prices no engine's own overheads, and FSDP is eurotrain's default (it composes with tp, pp, cp
and FP8; docs/planner.md)."""


def ranked(options: list[Option]) -> list[Option]:
    """Fitting layouts, fastest first (then the least memory)."""
    fit = [o for o in options if o.fits]

    def speed(o: Option) -> float:
        deepspeed = o.candidate.cfg.parallel.engine == "deepspeed"
        return o.speed.tokens_per_s_per_gpu * (DEEPSPEED_MARGIN if deepspeed else 1.0)

    return sorted(fit, key=lambda o: (-speed(o), o.memory.total))


def recommend(best: list[Option]) -> Option:
    """Among the best layout of each node count: the fewest GPU-hours, then the shortest run
    (more nodes than needed cost more hours for less time)."""
    return min(best, key=lambda o: (round(o.speed.gpu_hours, 1), o.speed.days))


def nothing_fits(req: Request, options: list[Option], reasons: list[str]) -> ConfigError:
    """The error when no layout fits any node count: the closest one and what would fit."""
    asked = ", ".join(str(n) for n in req.nodes)
    usable = req.usable_bytes / GIB
    if not options:
        why = reasons[0] if reasons else "no candidate layouts"
        return ConfigError(
            f"no layout of {req.cfg.model.name} passes the layout checks on {asked} node(s) of "
            f"{req.hw.gpus_per_node} GPUs; the first reason: {why}"
        )
    low = min(options, key=lambda o: o.memory.total)
    return ConfigError(
        f"nothing fits on {asked} node(s) of {req.hw.cluster}: the smallest layout "
        f"({low.layout()}, on {low.nodes} nodes) needs {low.memory.total / GIB:.1f} GiB per GPU, "
        f"{usable:.1f} GiB usable ({req.hw.memory_gib:g} GiB x --max-memory-fraction "
        f"{req.max_memory_fraction:g}); every layout tried already includes full activation "
        f"checkpointing and micro-batch 1; {_what_would_fit(req)}"
    )


def _what_would_fit(req: Request) -> str:
    """The smallest power-of-two node count past the asked ones where some layout fits, or
    why more nodes do not help."""
    nodes = 2 ** math.ceil(math.log2(max(req.nodes) + 1))
    while nodes <= MAX_SUGGESTED_NODES:
        opts, _ = evaluate(req, nodes)
        fit = [o for o in opts if o.fits]
        if fit:
            more = min(fit, key=lambda o: o.memory.total)
            return (
                f"it fits from {more.nodes} nodes ({more.layout()}, "
                f"{more.memory.total / GIB:.1f} GiB)"
            )
        if not opts:
            return (
                f"on {nodes} nodes or more the global batch of {req.cfg.train.global_batch_size} "
                f"sequences no longer covers the data-parallel ranks: raise --global-batch, use "
                f"a shorter --seq-len or a device with more memory"
            )
        nodes *= 2
    return (
        f"no node count up to {MAX_SUGGESTED_NODES} fits: use a shorter --seq-len, a smaller "
        f"model, or a device with more memory"
    )
