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
