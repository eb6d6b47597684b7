"""eurotrain's error types, and how the command line reports them.

Every error a user can fix (a bad config, a corrupt checkpoint or data file, a full disk, a run
that diverged) derives from ``EurotrainError``; its message says what was wrong and how to fix
it. The command line prints such an error as one line, once per job (rank 0), and exits non-zero;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import math
import os
import reprlib
import sys
from collections.abc import Callable
from typing import Any

SHOWN_CHARS = 160
"""Longest user value an error message shows."""


class _Shown(reprlib.Repr):
    """repr() cut short at every level, for user values in error messages."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = 4
        self.maxstring = self.maxother = 60
        self.maxlong = 40

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 256:  # builtins.repr refuses beyond 4300 digits and is slow below
            return f"<an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits>"
        return super().repr_int(x, level)

    def repr_bytes(self, x: bytes, level: int) -> str:
        cut = x[: self.maxstring]
        return repr(cut) + ("..." if len(x) > len(cut) else "")


_SHOWN = _Shown()


def shown(value: Any) -> str:
    """``repr(value)`` bounded to about a line, at any size or depth of ``value``: every error
    message that shows a user's value uses it (``f"{v!r:.200}"`` builds the whole repr first)."""
    return clip(_SHOWN.repr(value))  # at most a few thousand characters, whatever the value


def clip(text: str) -> str:
    """``text`` cut to SHOWN_CHARS, marked with "..." where it was cut."""
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def unreadable(error: BaseException) -> str:
    """Why a file could not be read or parsed, for a one-line message: the error's text, but
    "nested too deeply" for a RecursionError (a file nested deeper than a parser recurses),
    whose own text speaks of Python's stack, not of the file."""
    return "nested too deeply" if isinstance(error, RecursionError) else str(error)


class EurotrainError(Exception):
    """Bad input or a failed operation that the message explains; never a bug."""

    exit_code = 1
    label = "error"
    """What the command line prints before the message."""
    every_rank = True
    """Whether every rank raises the same error (config, layout, agreed checkpoint checks): then
    rank 0 alone reports it. False for an error only this rank saw; it reports it itself."""


class ConfigError(EurotrainError, ValueError):
    """A configuration value, key or file is wrong; the message says how to fix it."""

    exit_code = 2
    label = "configuration error"


class DataError(ConfigError):
    """An input data file is unreadable or malformed; names the file (and line) and the fix."""

    label = "data error"


class CheckpointError(EurotrainError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or could not be written; names the file."""

    label = "checkpoint error"


class NonFiniteLossError(EurotrainError, RuntimeError):
    """The loss or gradient norm stayed non-finite for more steps than allowed."""

    label = "training stopped"


class CollectiveError(EurotrainError, RuntimeError):
    """A collective timed out or lost a peer; names the ranks (and hosts) that stopped answering.

    Only the ranks still running raise it, each after its own failed collective: each reports."""

    label = "collective failed"
    every_rank = False


# OS errors that are a fact of the machine (a full disk, a read-only or forbidden path), not a bug.
_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM}


def this_rank() -> int:
    """This process's rank, before or after the process group exists (0 when alone)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    for name in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def describe(error: BaseException) -> str | None:
    """The one line to print for an error a user can fix, or None for a bug."""
    if isinstance(error, EurotrainError):
        return f"{error.label}: {error}"
    if isinstance(error, OSError) and error.errno in _USER_OS_ERRORS:
        return f"error: {error}"
    return None


def run_command(name: str, main: Callable[[], int]) -> int:
    """Run a command's body: a fixable error becomes one line on stderr (rank 0, or the rank
    that alone saw it) and a non-zero exit code; a bug keeps its traceback."""
    try:
        return main()
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        line = describe(e)
        if line is None:
            raise
        rank = this_rank()
        every = getattr(e, "every_rank", True)
        if rank == 0 or not every:
            prefix = f"{name}: " + (f"rank {rank}: " if rank and not every else "")
            print(f"{prefix}{line}", file=sys.stderr, flush=True)
        return getattr(e, "exit_code", 1)
