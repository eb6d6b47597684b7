"""Checkpointing as a callback: periodic (async) saves, the final save, on_checkpoint_saved, and
``checkpoint.interval: auto`` (eurotrain/checkpoint/interval.py)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from eurotrain.callbacks import Callback, StepMetrics
from eurotrain.checkpoint.checkpointer import Checkpointer
from eurotrain.checkpoint.interval import AutoInterval

if TYPE_CHECKING:
    from eurotrain.train import Trainer, TrainResult


class SaveCheckpoints(Callback):
    """Saves every ``checkpoint.interval`` steps (or as ``auto`` decides) and after the last step
    (also after a stop signal: the trainer puts this callback after all others, so it sees the
    stop, and the saved state includes every callback's work on the step); tells the other
    callbacks when a save is committed. Its state (the auto interval's measurements) is saved
    with the checkpoints."""

    name = "checkpoint"

    def __init__(
        self, checkpointer: Checkpointer, mtbf_s: float, mtbf_source: str, max_steps: int
    ) -> None:
        self.checkpointer = checkpointer
        interval = checkpointer.cfg.interval
        self.saves = interval != 0
        self.auto = AutoInterval(mtbf_s, max_steps) if interval == "auto" else None
        self.interval = 0 if isinstance(interval, str) else interval
        self.async_save = checkpointer.cfg.async_save
        self.mtbf_source = mtbf_source
        self._since = (0, 0.0)
        """(step, host clock) at the end of the last save: the step time between saves."""
        self._staging_wait = 0.0
        """Seconds the training thread waited for the last save's copy to host memory."""

    def state_dict(self) -> dict[str, Any]:
        return {"auto": self.auto.state_dict()} if self.auto else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.auto is not None and isinstance(state.get("auto"), dict):
            self.auto.load_state_dict(state["auto"])

    def on_train_start(self, trainer: Trainer) -> None:
        self._since = (trainer.state.step, time.perf_counter())
        if self.auto is not None:
            self.auto.start(trainer.state.step)

    def _save(self, trainer: Trainer, sync: bool) -> None:
        trainer.sync_metrics()  # the counters saved must include every finished step
        start = time.perf_counter()
        with trainer.ledger.span("checkpoint"):
            self.checkpointer.save(
                trainer.state.step, trainer.checkpoint_parts(), trainer.run_info(), sync
            )
        if self.auto is not None:
            # The stall of a save: its start here, and the wait for its staging before the next
            # update (known only then: the previous save's wait stands in for this one's).
            stall = time.perf_counter() - start + self._staging_wait
            self._retune(trainer, start, stall)
        self._since = (trainer.state.step, time.perf_counter())
        self._announce(trainer)

    def _retune(self, trainer: Trainer, start: float, stall: float) -> None:
        assert self.auto is not None
        last_step, last_clock = self._since
        steps = trainer.state.step - last_step
        inputs = np.array([stall, (start - last_clock) / steps if steps > 0 else 0.0])
        if trainer.dist.world_size > 1:  # every rank must choose the same steps
            dist.all_reduce(torch.from_numpy(inputs), dist.ReduceOp.MAX, group=trainer.host_group)
        line = self.auto.measured(trainer.state.step, float(inputs[0]), float(inputs[1]))
        if line:
            trainer.metrics.info(f"{line} (MTBF from {self.mtbf_source})")

    def _announce(self, trainer: Trainer) -> None:
        for step, path in self.checkpointer.committed():
            trainer.callbacks.call("on_checkpoint_saved", trainer, step, str(path))

    def on_before_optimizer_step(self, trainer: Trainer, step: int) -> None:
        # An async save's copy to host memory overlaps this step's forward and backward; the
        # update must not change the tensors before it is complete.
        start = time.perf_counter()
        with trainer.ledger.span("checkpoint"):
            waited = self.checkpointer.wait_staged()
        if waited:
            self._staging_wait = time.perf_counter() - start

    def on_step_end(self, trainer: Trainer, step: int, metrics: StepMetrics) -> None:
        due = self.auto.due(step) if self.auto else self.interval and step % self.interval == 0
        if self.saves and trainer.finished:
            self._save(trainer, sync=True)  # the final save: committed before training ends
        elif due:
            self._save(trainer, sync=not self.async_save)
        else:
            self._announce(trainer)

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        try:
            with trainer.ledger.span("checkpoint"):
                self.checkpointer.wait()
            self._announce(trainer)
        finally:
            self.checkpointer.close()

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        # No final save of a failed step; saves already started still commit.
        self.checkpointer.close()
