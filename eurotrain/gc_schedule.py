"""Python's cyclic garbage collector at fixed steps, on every rank at once.

Left automatic, the collector runs whenever allocations cross a threshold: at a different moment
on each rank, and a collection of the oldest generation walks every object of the process (tens
or hundreds of milliseconds). One rank paused there makes every other rank wait for it at the
next collective, and a checkpoint's planning, which allocates hundreds of thousands of small
objects on the checkpoint thread, triggers collections that hold the GIL the training loop
needs (an 80-layer model's save: ~270 collections, a fifth to a third of its time;
benchmarks/RESULTS.md).
torchtitan (``training.gc_freq``) and Megatron-LM (``--manual-gc``) do the same.

With ``train.gc_interval`` N > 0: one full collection at the start, automatic collection off,
then the young generations (0 and 1: what the steps allocated since) collected every N steps and
everything every 10 N steps, on the same step on every rank; at the end (or an error) the
collector is left as it was found. Reference counting still frees everything that is not in a
cycle at once, so memory grows between collections only by cyclic garbage (device memory too,
where a cycle holds a tensor): if it does, lower the interval or set 0.
"""

from __future__ import annotations

import gc
from typing import Any

FULL_EVERY = 10
"""A collection of every generation every this many scheduled collections."""


class ScheduledGC:
    """The callback: collections at fixed steps instead of whenever allocations trigger them."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self._was_enabled: bool | None = None
        self._count = 0

    def on_train_start(self, trainer: Any) -> None:
        self._was_enabled = gc.isenabled()
        gc.collect()  # the set-up's garbage, once
        gc.disable()

    def on_step_end(self, trainer: Any, step: int, metrics: Any) -> None:
        if step % self.interval:
            return
        self._count += 1
        gc.collect(2 if self._count % FULL_EVERY == 0 else 1)

    def _restore(self) -> None:
        if self._was_enabled:
            gc.enable()
        self._was_enabled = None

    def on_train_end(self, trainer: Any, result: Any) -> None:
        self._restore()

    def on_error(self, trainer: Any, error: BaseException) -> None:
        self._restore()
