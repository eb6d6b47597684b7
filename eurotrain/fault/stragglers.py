"""Stragglers: ranks that compute more slowly than the others, named at log steps.

Each rank times its steps on the host, from the start of a step to its end, and the part of that
spent waiting for the others in the step's host agreement (the token count). At each log step
the ranks gather (compute = step - wait, wait) per step over the host group; ranks whose compute
exceeds the median by more than ``fault.straggler_margin`` are named with their nodes in the log
and in metrics.jsonl (``stragglers``).

What this sees: a rank slow on the host (data loading, a busy or throttled CPU, slow I/O) makes
the others wait in the agreement. A slow GPU slows every rank alike through the collectives, and
is not singled out by host clocks.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from eurotrain.callbacks import Callback, StepMetrics
from eurotrain.fault.inject import slow_for_test
from eurotrain.fault.peers import node_name

if TYPE_CHECKING:
    from eurotrain.train import Trainer

NOISE_S = 0.005
"""Differences below this are never flagged (timer and scheduling noise of short steps)."""


class Stragglers(Callback):
    def __init__(self, margin: float, rank: int, world_size: int, group: Any = None) -> None:
        self.margin, self.rank, self.world_size, self.group = margin, rank, world_size, group
        self.nodes: list[str] = []
        self.busy = self.wait = 0.0
        self.steps = 0
        self._start = self._wait_at_start = 0.0

    def on_train_start(self, trainer: Trainer) -> None:
        self.nodes = [node_name()]
        if self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, node_name(), group=self.group)
            self.nodes = [str(n) for n in gathered]

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        self._start = time.perf_counter()
        self._wait_at_start = trainer.host_wait_s
        slow_for_test(self.rank)

    def on_step_end(self, trainer: Trainer, step: int, metrics: StepMetrics) -> None:
        wait = trainer.host_wait_s - self._wait_at_start
        self.busy += time.perf_counter() - self._start - wait
        self.wait += wait
        self.steps += 1
        if trainer.is_log_step(step) and self.world_size > 1:
            found = self.check()
            if found:
                metrics.update(stragglers=found)
                trainer.metrics.info(f"eurotrain: step {step}: {describe(found)}")

    def check(self) -> list[dict[str, Any]]:
        """Gather every rank's compute and wait per step since the last check; the slow ones."""
        mine = np.array([self.busy, self.wait], dtype=np.float64) / max(self.steps, 1)
        self.busy = self.wait = 0.0
        self.steps = 0
        parts = [torch.zeros(2, dtype=torch.float64) for _ in range(self.world_size)]
        dist.all_gather(parts, torch.from_numpy(mine), group=self.group)
        compute = [float(p[0]) for p in parts]
        median = statistics.median(compute)
        return [
            {"rank": r, "host": self.nodes[r] if r < len(self.nodes) else "?",
             "compute_s": round(c, 4), "wait_s": round(float(parts[r][1]), 4),
             "median_compute_s": round(median, 4)}
            for r, c in enumerate(compute)
            if c > median * (1 + self.margin) and c - median > NOISE_S
        ]  # fmt: skip


def describe(found: list[dict[str, Any]]) -> str:
    shown = ", ".join(
        f"rank {s['rank']} (host {s['host']}) {s['compute_s']:.3g} s" for s in found[:8]
    ) + (f" and {len(found) - 8} more" if len(found) > 8 else "")
    return (
        f"straggler{'s' if len(found) > 1 else ''}: {shown} of compute per step against a "
        f"median of {found[0]['median_compute_s']:.3g} s"
    )
