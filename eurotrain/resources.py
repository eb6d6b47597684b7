"""Data that ships inside the package: cluster profiles and config presets.

Both live at the top of the source tree (``launch/clusters/``, ``configs/``) and reach the
package through links, as ``kernels/`` does: ``eurotrain/profiles -> ../launch/clusters`` and
``eurotrain/presets -> ../configs``. A plain checkout and an editable install read them through
the links; a wheel carries them as plain files (package-data in pyproject.toml). Either way they
sit next to this module, so nothing here depends on the current directory or on a checkout.

``EUROTRAIN_CLUSTERS`` names further profile directories (several separated by ``os.pathsep``),
searched before the packaged ones: a profile there adds a machine, or overrides the packaged
profile of the same name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROFILES = PACKAGE_DIR / "profiles"
PRESETS = PACKAGE_DIR / "presets"
PACKAGED = "package"
FROM_ENV = "EUROTRAIN_CLUSTERS"


@dataclass(frozen=True)
class Profile:
    """Where one cluster profile comes from."""

    name: str
    path: Path
    source: str
    """PACKAGED, or FROM_ENV for a directory named by EUROTRAIN_CLUSTERS."""
    overrides: bool = False
    """Whether it hides a packaged profile of the same name."""


def profile_dirs() -> list[tuple[Path, str]]:
    """The directories searched for NAME.yaml, first match wins, with their source."""
    extra = os.environ.get(FROM_ENV, "")
    dirs = [(Path(d), FROM_ENV) for d in extra.split(os.pathsep) if d]
    return [*dirs, (PROFILES, PACKAGED)]


def profiles() -> dict[str, Profile]:
    """Every profile by name: the first directory that holds NAME.yaml provides it."""
    found: dict[str, Profile] = {}
    for directory, source in profile_dirs():
        for path in sorted(directory.glob("*.yaml")):
            if path.stem in found:
                if source == PACKAGED:
                    first = found[path.stem]
                    found[path.stem] = Profile(first.name, first.path, first.source, True)
                continue
            found[path.stem] = Profile(path.stem, path, source)
    return dict(sorted(found.items()))


def searched() -> str:
    """The profile directories, for an error message (a missing one marked)."""
    return ", ".join(
        f"{d}{'' if d.is_dir() else ' (missing)'}"
        + (f" (from {FROM_ENV})" if source == FROM_ENV else "")
        for d, source in profile_dirs()
    )


def presets() -> dict[str, Path]:
    """The config presets shipped with eurotrain, by name (tiny, llama3-8b, ...)."""
    return {p.stem: p for p in sorted(PRESETS.glob("*.yaml"))}


def preset_file(name: str | Path) -> Path | None:
    """The preset a bare name such as ``tiny`` or ``tiny.yaml`` stands for; None for anything
    else (a path with a directory part is never a preset)."""
    p = Path(name)
    if len(p.parts) != 1:
        return None
    return presets().get(p.name.removesuffix(".yaml"))


def config_file(path: str | Path) -> Path:
    """The YAML file ``path`` names: itself when it exists, else the preset of that name, else
    ``path`` unchanged (the caller reports it missing). A file of yours wins over a preset."""
    p = Path(path)
    if p.exists():
        return p
    return preset_file(p) or p
