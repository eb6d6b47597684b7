"""The Triton kernels live in the top-level kernels/ folder (the design's layout) and are imported
as ``eurotrain.kernels`` (through the symlink eurotrain/kernels -> ../kernels) from a plain
checkout, from the editable install the Makefile makes, and from a built wheel."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = (
    "import eurotrain.kernels as k, eurotrain.kernels.rmsnorm, eurotrain.kernels.cross_entropy; "
    "print(k.__file__)"
)


def _import_from(cwd: Path, pythonpath: str | None) -> Path:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip())


def test_kernels_source_is_top_level_and_linked_once():
    link = REPO / "eurotrain" / "kernels"
    assert link.is_symlink() and os.readlink(link) == "../kernels"
    assert (REPO / "kernels" / "__init__.py").is_file()
    assert not (REPO / "kernels").is_symlink()


def test_plain_checkout(tmp_path):
    found = _import_from(tmp_path, str(REPO))
    assert found.resolve() == (REPO / "kernels" / "__init__.py").resolve()


def test_editable_install(tmp_path):
    # What is checked is the Makefile's venv (`make venv`: pip install -e .). The suite run from
    # another environment (a conda env, a venv of another checkout, a wheel install) has its own
    # eurotrain, which this checkout does not decide.
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip(f"run from {sys.prefix}, not this checkout's .venv (make venv)")
    site = sysconfig.get_paths()["purelib"]  # the venv's own, not an egg-info in the checkout
    (dist,) = [d for d in metadata.distributions(path=[site]) if d.name == "eurotrain"]
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    assert direct.get("dir_info", {}).get("editable"), (
        "eurotrain is not installed in editable mode here: run `make venv` (pip install -e .)"
    )
    found = _import_from(tmp_path, None)  # no PYTHONPATH: the editable finder resolves it
    assert found.resolve() == (REPO / "kernels" / "__init__.py").resolve()


def test_wheel_holds_the_kernels_as_files(tmp_path):
    # Built from a copy (setuptools writes build/ and egg-info next to the sources), symlink
    # kept as a link; no build isolation: setuptools is pinned in the venv, no index needed.
    src = tmp_path / "src"
    junk = shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info", "__pycache__")
    shutil.copytree(REPO, src, symlinks=True, ignore=junk)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("eurotrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("__init__.py", "rmsnorm.py", "cross_entropy.py", "reference.py"):
        assert f"eurotrain/kernels/{name}" in names
    assert not any(n.startswith("kernels/") for n in names)  # shipped once, inside the package
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    found = _import_from(tmp_path, str(site))
    assert found == site / "eurotrain" / "kernels" / "__init__.py"
    assert not found.is_symlink()


@pytest.mark.parametrize("module", ["eurotrain.kernels", "eurotrain.kernels.rmsnorm"])
def test_kernels_never_import_the_rest_of_eurotrain(module, tmp_path):
    code = (
        f"import sys, {module}; "
        "loaded = sorted(m for m in sys.modules if m.startswith('eurotrain') "
        "and not m.startswith('eurotrain.kernels') and m not in ('eurotrain', 'eurotrain._lazy'));"
        "print(loaded)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_make_refuses_a_python_older_than_the_pins_need(tmp_path):
    # A stand-in for CPython 3.10 (the real one is not on every machine): it reports 3.10 and
    # runs what the Makefile asks. make must stop before it creates anything, saying what to do.
    if shlex.split(str(tmp_path)) != [str(tmp_path)]:
        pytest.skip(f"make's PY cannot name a path with spaces or quotes: {tmp_path}")
    fake = tmp_path / "fake.py"
    fake.write_text(
        "import sys\nsys.version_info = (3, 10, 13, 'final', 0)\n"
        "code = sys.argv[2]\nsys.argv = ['-c']\nexec(code)\n"
    )
    old = tmp_path / "python3.10"
    old.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {fake} "$@"\n')
    old.chmod(0o755)
    venv = tmp_path / "venv"
    done = subprocess.run(
        ["make", "-C", str(REPO), "venv", f"PY={old}", f"VENV={venv}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "is Python 3.10; the pinned versions need 3.11 or newer" in done.stderr
    assert "make PY=python3.11" in done.stderr
    assert not venv.exists()
    # pyproject says the same
    assert 'requires-python = ">=3.11"' in (REPO / "pyproject.toml").read_text()
