"""A checkpoint directory on disk: its files, its commit marker, discovery and retention.

    <dir>/step-000120/            committed: holds COMMITTED.json
          .metadata               DCP's global plan (pickled by DCP; verified before loading)
          __0_0.distcp ...        one data file per rank (single_file_per_rank)
          config.yaml             the run's resolved config
          COMMITTED.json          the commit marker: step, layout, every file's size + SHA-256
    <dir>/step-000130.tmp/        being written, or torn by a crash: never loaded

A checkpoint exists only once rank 0 has written the marker into ``step-N.tmp`` and renamed the
directory to ``step-N`` (then fsynced the parent), after every rank's files were durable.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from eurotrain.checkpoint.storage import DIGESTS, fsync_path, read_small
from eurotrain.errors import CheckpointError

__all__ = ["MARKER", "CheckpointError", "Found", "latest", "read_marker", "scan", "step_dir"]

MARKER = "COMMITTED.json"
FORMAT = "eurotrain-checkpoint/1"
MAX_MARKER = 64 << 20
"""Largest commit marker read (a 1,000-rank checkpoint's is a few hundred KB)."""
_NAME = re.compile(r"^step-(\d+)(\.tmp)?$")
_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$|^\.metadata$")
"""A file name a marker may list: a plain name inside the checkpoint directory, no path."""


def step_dir(root: Path, step: int, tmp: bool = False) -> Path:
    return root / (f"step-{step:06d}" + (".tmp" if tmp else ""))


@dataclass(frozen=True)
class Found:
    path: Path
    step: int
    marker: dict[str, Any] | None
    problem: str = ""
    """Why this directory is not a usable checkpoint; empty when it is."""
    torn: bool = False
    """Never committed (a .tmp directory, or no marker: a save or a deletion cut short), as
    opposed to committed but damaged (an unreadable or inconsistent marker)."""


def read_marker(path: Path) -> dict[str, Any]:
    """The parsed commit marker of a checkpoint directory; CheckpointError when unusable."""
    marker_path = path / MARKER
    try:
        marker = json.loads(read_small(marker_path, MAX_MARKER))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no commit marker {MARKER} (incomplete save)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{marker_path}: unreadable commit marker ({e})") from None
    except RecursionError:  # JSON nested deeper than Python parses
        raise CheckpointError(f"{marker_path}: not a {FORMAT} commit marker") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise CheckpointError(f"{marker_path}: not a {FORMAT} commit marker")
    for key, kind in (("step", int), ("files", dict), ("world_size", int)):
        if not isinstance(marker.get(key), kind):
            raise CheckpointError(f"{marker_path}: field {key!r} missing or not {kind.__name__}")
    for name, entry in marker["files"].items():
        ok = isinstance(entry, dict) and type(entry.get("size")) is int and entry["size"] >= 0
        ok = ok and any(isinstance(entry.get(key), str) for key in DIGESTS)
        if not (_FILE.match(name) and ok):
            raise CheckpointError(f"{marker_path}: bad file entry {name!r:.80}")
    return marker


def make_marker(
    info: dict[str, Any], world_size: int, files: dict[str, Any], write_s: float
) -> dict[str, Any]:
    import torch

    return {
        "format": FORMAT,
        "step": info["step"],
        "tokens_seen": info["tokens_seen"],
        "kind": info["kind"],
        "world_size": world_size,
        "layout": info["layout"],
        "config_hash": info.get("config_hash", ""),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "write_seconds": round(write_s, 3),
        "files": dict(sorted(files.items())),
    }


def scan(root: Path) -> list[Found]:
    """Every step-N[.tmp] directory under root, oldest first, with why it is unusable if so."""
    found: list[Found] = []
    if not root.is_dir():
        return found
    for child in root.iterdir():
        m = _NAME.match(child.name)
        if not m or not child.is_dir():
            continue
        step = int(m.group(1))
        if m.group(2):
            found.append(Found(child, step, None, "unfinished save (.tmp)", torn=True))
            continue
        if not (child / MARKER).exists():
            found.append(Found(child, step, None, f"no commit marker {MARKER}", torn=True))
            continue
        try:
            marker = read_marker(child)
        except CheckpointError as e:
            found.append(Found(child, step, None, str(e)))
            continue
        if marker["step"] != step:
            found.append(Found(child, step, None, f"marker says step {marker['step']}"))
            continue
        found.append(Found(child, step, marker))
    return sorted(found, key=lambda f: (f.step, f.path.name))


def latest(root: Path) -> tuple[Found | None, list[Found]]:
    """(newest committed checkpoint or None, the incomplete ones that were skipped)."""
    entries = scan(root)
    good = [f for f in entries if not f.problem]
    bad = [f for f in entries if f.problem]
    return (good[-1] if good else None), bad


def describe_dir(root: Path, newest: int = 5) -> str:
    """The newest checkpoint directories under root, for an error message."""
    entries = scan(root)
    if not entries:
        return f"{root} holds no checkpoints"
    shown = [f.path.name + (" (incomplete)" if f.torn else " (damaged)" if f.problem else "")
             for f in reversed(entries[-newest:])]  # fmt: skip
    more = f" and {len(entries) - newest} older" if len(entries) > newest else ""
    return f"{root} holds {', '.join(shown)}{more}"


def to_delete(committed_steps: list[int], keep_last: int, keep_every: int) -> list[int]:
    """Steps that retention removes. The newest is always kept; keep_last 0 keeps everything;
    steps that are multiples of keep_every are kept forever."""
    steps = sorted(committed_steps)
    if keep_last == 0 or len(steps) <= 1:
        return []
    keep = set(steps[-max(keep_last, 1) :])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    return [s for s in steps if s not in keep]


def remove_checkpoint(path: Path) -> None:
    """Delete marker first (and make that durable) so a crash mid-delete leaves an incomplete
    directory, never a 'committed' one with files missing."""
    marker = path / MARKER
    if marker.exists():
        marker.unlink()
        fsync_path(path)
    shutil.rmtree(path, ignore_errors=True)


def apply_retention(root: Path, newest: int, keep_last: int, keep_every: int) -> list[Path]:
    """Run after the commit of step ``newest`` succeeded: drop old checkpoints beyond the
    policy and stale .tmp directories older than ``newest``; returns what was removed."""
    entries = scan(root)
    committed = [f.step for f in entries if not f.problem and f.step <= newest]
    doomed = set(to_delete(committed, keep_last, keep_every))
    removed = []
    for f in entries:
        stale_tmp = f.problem and f.step < newest
        if (not f.problem and f.step in doomed) or stale_tmp:
            remove_checkpoint(f.path)
            removed.append(f.path)
    if removed:
        fsync_path(root)
    return removed
