"""Checkpointing as a callback: periodic (async) saves, the final save, on_checkpoint_saved."""

from __future__ import annotations

from typing import TYPE_CHECKING

from eurotrain.callbacks import Callback, StepMetrics
from eurotrain.checkpoint.checkpointer import Checkpointer

if TYPE_CHECKING:
    from eurotrain.train import Trainer, TrainResult


class SaveCheckpoints(Callback):
    """Saves every ``checkpoint.interval`` steps and after the last step (also after a stop
    signal: the trainer puts this callback after all others, so it sees the stop, and the
    saved state includes every callback's work on the step); tells the other callbacks when a
    save is committed."""

    def __init__(self, checkpointer: Checkpointer) -> None:
        self.checkpointer = checkpointer
        self.interval = checkpointer.cfg.interval
        self.async_save = checkpointer.cfg.async_save

    def _save(self, trainer: Trainer, sync: bool) -> None:
        trainer.sync_metrics()  # the counters saved must include every finished step
        self.checkpointer.save(
            trainer.state.step, trainer.checkpoint_parts(), trainer.run_info(), sync
        )
        self._announce(trainer)

    def _announce(self, trainer: Trainer) -> None:
        for step, path in self.checkpointer.committed():
            trainer.callbacks.call("on_checkpoint_saved", trainer, step, str(path))

    def on_before_optimizer_step(self, trainer: Trainer, step: int) -> None:
        # An async save's copy to host memory overlaps this step's forward and backward; the
        # update must not change the tensors before it is complete.
        self.checkpointer.wait_staged()

    def on_step_end(self, trainer: Trainer, step: int, metrics: StepMetrics) -> None:
        if self.interval and trainer.finished:
            self._save(trainer, sync=True)  # the final save: committed before training ends
        elif self.interval and step % self.interval == 0:
            self._save(trainer, sync=not self.async_save)
        else:
            self._announce(trainer)

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        try:
            self.checkpointer.wait()
            self._announce(trainer)
        finally:
            self.checkpointer.close()

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        # No final save of a failed step; saves already started still commit.
        self.checkpointer.close()
