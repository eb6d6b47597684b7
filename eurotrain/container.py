"""What a containerised run must see of the host: the directories its config reads and writes.

`eurotrain launch --container IMAGE` binds into the Apptainer/Singularity container, at the same
paths, the config file's directory (and those of the files it names with ``base:``), the run
directory (``train.output_dir``), the checkpoint directories (``checkpoint.dir``, ``resume``,
``init_from``) and the data (``data.corpus``, ``data.tokenizer``, ``data.sources``,
``data.validation_sources``). The script makes the writable ones before the container starts:
a bind whose source is missing stops the runtime.

The paths are the user's text, so they are checked here: a control character is refused (it
would break the script), and so are ',' and ':' (the runtime splits ``--bind`` values at them).
A relative path stays relative: the job's shell anchors it at its working directory (the
submit directory, where the ranks resolve it too), so the script does not depend on the host
it was written on. Paths inside another bound path, or inside one of the profile's own binds,
are not bound twice.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from eurotrain import resources
from eurotrain.clusters import control_character
from eurotrain.configtools import config_chain
from eurotrain.errors import ConfigError

if TYPE_CHECKING:
    from eurotrain.config import Config

HERE = "."
"""The job's working directory, as a relative path."""


@dataclass(frozen=True)
class Bind:
    """One host path to bind: absolute, or relative to the job's working directory."""

    path: str
    writable: bool = False
    """The run writes there: made (mkdir -p) before the container starts."""

    @property
    def relative(self) -> bool:
        return not os.path.isabs(self.path)


def binds(
    cfg: Config, config_path: str, profile_binds: list[str], log_dir: str | None = None
) -> list[Bind]:
    """The paths to bind for a run of `cfg` (read from `config_path`), in a fixed order,
    without the ones an earlier bind or a profile bind already covers. ``log_dir``: the job's
    log directory, where the ranks report to the job script (eurotrain/chain.py)."""
    wanted: list[tuple[str, str, bool]] = [
        ("config", str(p), False)
        for p in config_chain(config_path)
        if p.parent != resources.PRESETS  # a preset is inside the container's own eurotrain
    ]
    wanted.append(("train.output_dir", cfg.train.output_dir, True))
    ck = cfg.checkpoint
    if ck.dir:
        wanted.append(("checkpoint.dir", ck.dir, True))
    if ck.resume not in ("auto", "none", ""):
        wanted.append(("checkpoint.resume", ck.resume, False))
    if ck.init_from:
        wanted.append(("checkpoint.init_from", ck.init_from, False))
    data = cfg.data
    if not data.sources and data.corpus != "demo":
        wanted.append(("data.corpus", data.corpus, False))
    if not data.sources and data.tokenizer != "byte":
        wanted.append(("data.tokenizer", data.tokenizer, False))
    wanted += [("data.sources", s.path, False) for s in data.sources]
    wanted += [("data.validation_sources", s.path, False) for s in data.validation_sources]
    if log_dir is not None:
        wanted.append(("--log-dir", log_dir, True))

    taken = [os.path.normpath(b) for b in profile_binds if "$" not in b]
    out: list[Bind] = []
    for key, text, writable in wanted:
        _check(key, text)
        path = _normal(_where(key, text))
        covered = [b.path for b in out] + taken
        if any(_inside(path, other) for other in covered):
            continue
        out = [b for b in out if not _inside(b.path, path)]  # a wider path replaces narrower
        out.append(Bind(path, writable))
    return out


def _check(key: str, text: str) -> None:
    """Refuse what the script or the runtime would misread, naming the key and the fix."""
    control = control_character(text)
    problem = f"contains {control}" if control else None
    for ch in ",:":
        if problem is None and ch in text:
            problem = f"contains {ch!r}, which the container runtime reads as a separator in --bind"
    if problem:
        raise ConfigError(
            f"{key} {text!r}: {problem}; with --container every path the run uses is bound "
            f"into the container: choose a path without it"
        )


def _where(key: str, text: str) -> str:
    """The directory to bind for the value of `key`: a config file's or a data file's
    directory, the fixed part of a glob, a directory itself."""
    if key == "config":
        return str(Path(text).parent)
    if key in ("data.corpus", "data.tokenizer"):
        return _fixed_part(text)
    return text


def _normal(text: str) -> str:
    """``a/./b/`` is ``a/b``; a relative path above the working directory is made absolute
    (bound at its real place rather than as $PWD/../x)."""
    path = os.path.normpath(text or HERE)
    if not os.path.isabs(path) and path.split(os.sep)[0] == "..":
        path = os.path.abspath(path)
    return path


def _fixed_part(pattern: str) -> str:
    """The directory holding everything `pattern` can name: the fixed part of a glob; a file's
    directory (a name with a suffix, such as text.jsonl or tokenizer.json: decided from the
    text alone, so the script does not depend on what the login node holds); a directory."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), None)
    if fixed is not None:
        return str(Path(*parts[:fixed])) if fixed else HERE
    return str(Path(pattern).parent) if Path(pattern).suffix else pattern


def _inside(path: str, other: str) -> bool:
    """Whether `path` is `other` or below it (both absolute, or both relative; the working
    directory holds every relative path)."""
    if os.path.isabs(path) != os.path.isabs(other):
        return False
    if other == HERE:
        return True
    return path == other or path.startswith(other.rstrip(os.sep) + os.sep)
