"""Stopping cleanly before the walltime.

SLURM sends the signal that ``eurotrain launch`` asks for (``--signal=B:USR1@300``, forwarded to
every rank) some minutes before the walltime, and SIGTERM when a job is cancelled or preempted.
Either one only sets a flag here; the trainer shares the flag with all ranks at its next step, so
every rank stops after the same step, writes the final checkpoint and exits normally. Without a
handler, SIGUSR1's default action would kill the ranks with no checkpoint at all.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from eurotrain.callbacks import Callback, StepMetrics

if TYPE_CHECKING:
    from eurotrain.train import Trainer, TrainResult


class StopRequest:
    """Install with ``with StopRequest() as stop:``; ``stop.signal_name`` is set once signalled."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals reach only it
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


class StopOnSignal(Callback):
    """The stop signal as a callback: a signal on any rank stops every rank after the same step.

    The flag is agreed on the host (a CPU process group, no device sync) without blocking: the
    all-reduce started after step k is read after step k + 1, so every rank stops after the
    same step, one step after the signal arrived.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.request = StopRequest()
        self.group = group
        self._box = np.zeros(1, dtype=np.float64)
        self._work: dist.Work | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        self.request.__enter__()

    def _agreed(self) -> bool:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.request.requested
        agreed = False
        if self._work is not None:
            self._work.wait()
            agreed = bool(self._box[0] > 0)
        self._box[0] = float(self.request.requested)
        self._work = dist.all_reduce(torch.from_numpy(self._box), group=self.group, async_op=True)
        return agreed

    def on_step_end(self, trainer: Trainer, step: int, metrics: StepMetrics) -> None:
        if not self._agreed() or trainer.finished:
            return
        here = self.request.signal_name or "a signal on another rank"
        saved = " with a final checkpoint" if trainer.cfg.checkpoint.interval else ""
        trainer.request_stop(here)
        trainer.metrics.info(
            f"eurotrain: stop requested ({here}): stopping after step {step} of "
            f"{trainer.cfg.train.steps}{saved}; resubmit the same job to resume"
        )

    def _finish(self) -> None:
        if self._work is not None:  # every rank started the same number of agreements
            self._work.wait()
            self._work = None
        self.request.__exit__(None, None, None)

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        self._finish()

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        self.request.__exit__(None, None, None)
