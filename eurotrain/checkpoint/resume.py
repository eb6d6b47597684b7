"""Which checkpoint a run starts from: the candidates per ``checkpoint.resume`` and
``init_from``, and the early check that a named one exists (before the model is built).

    resume auto   every committed checkpoint under the checkpoint directory, newest first: the
                  first that verifies is loaded, damaged newer ones are skipped with a warning;
                  if none verifies, an error (never a silent fresh start). No committed one at
                  all: init_from, if set, else a fresh start.
    resume none   init_from, if set, else a fresh start.
    resume PATH   exactly that checkpoint; damaged is an error.

These functions look at the file system only; rank 0 calls them and broadcasts the answer
(checkpointer.py), so every rank tries the same checkpoints in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eurotrain.checkpoint.config import CheckpointConfig
from eurotrain.checkpoint.directory import MARKER, describe_dir, latest, scan


@dataclass(frozen=True)
class Candidate:
    path: str
    weights_only: bool
    source: str
    """"auto" (found in the checkpoint directory), "checkpoint.resume" or "checkpoint.init_from"
    (named in the config: damaged is an error, never a reason to try another)."""
    problem: str = ""
    """Known before verifying: a committed directory whose marker is unreadable."""


def checkpoint_root(cfg: CheckpointConfig, run_dir: Path) -> Path:
    return Path(cfg.dir) if cfg.dir else Path(run_dir) / "checkpoints"


def candidates(cfg: CheckpointConfig, root: Path) -> tuple[list[Candidate], list[str]]:
    """(checkpoints to try in order, notes on never-committed directories passed over)."""
    if cfg.resume not in ("auto", "none"):
        return [Candidate(cfg.resume, False, "checkpoint.resume")], []
    notes: list[str] = []
    found: list[Candidate] = []
    if cfg.resume == "auto":
        for entry in reversed(scan(root)):
            if entry.torn:
                notes.append(f"checkpoint {entry.path} ignored: {entry.problem}")
            else:
                found.append(Candidate(str(entry.path), False, "auto", entry.problem))
    if not found and cfg.init_from:
        found.append(Candidate(cfg.init_from, True, "checkpoint.init_from"))
    return found, notes


def source_problem(cfg: CheckpointConfig, root: Path) -> str:
    """Why a checkpoint the config names cannot be loaded at all (missing, not a checkpoint);
    empty when it can be tried. init_from counts only where no resume checkpoint is found."""
    if cfg.resume not in ("auto", "none"):
        return _path_problem(Path(cfg.resume), "checkpoint.resume")
    if cfg.init_from and not (cfg.resume == "auto" and latest(root)[0] is not None):
        return _path_problem(Path(cfg.init_from), "checkpoint.init_from")
    return ""


def _path_problem(path: Path, key: str) -> str:
    if (path / MARKER).is_file():
        return ""
    if not path.exists():
        parent = path.parent
        where = describe_dir(parent) if parent.is_dir() else f"{parent} does not exist either"
        return f"{key}: {path} does not exist ({where})"
    if not path.is_dir():
        return f"{key}: {path} is a file, not a checkpoint directory (step-N)"
    newest, _ = latest(path)
    if newest is not None:
        return (
            f"{key}: {path} is a directory of checkpoints, not one checkpoint: name one, e.g. "
            f"{newest.path} (the newest committed), or set checkpoint.dir to it with resume auto"
        )
    return (
        f"{key}: {path} is not a committed checkpoint (no {MARKER}: an unfinished save, or "
        f"not a eurotrain checkpoint)"
    )
