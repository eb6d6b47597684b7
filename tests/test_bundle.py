"""`eurotrain bundle`: bad input is refused before anything is built or downloaded; a bundle
built for this machine installs into a fresh venv with no index (PIP_NO_INDEX=1) and trains."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from eurotrain import bundle
from eurotrain.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if pip would be run (a build or a download) or a wheel built."""

    def refuse(*args, **kwargs):
        pytest.fail(f"pip ran for input that should have been refused: {args}")

    monkeypatch.setattr(bundle, "_pip", refuse)
    monkeypatch.setattr(bundle, "_build_eurotrain", refuse)


def _refused(capsys, tmp_path, *args: str) -> str:
    rc = cli_main(["bundle", *args])
    out, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1, (rc, out, err)
    return err


def _fake_wheel(directory: Path, name: str) -> None:
    directory.mkdir(exist_ok=True)
    (directory / name).write_bytes(b"")


@pytest.mark.parametrize(
    "args, says",
    [
        (["--cluster", "lumi"], "unknown cluster 'lumi'. Did you mean 'lumi-g'?"),
        (["--cluster", "local", "--python-version", "3.10"],
         "--python-version 3.10: a bundle can target CPython 3.11, 3.12, 3.13, 3.14"),
        (["--cluster", "local", "--python-version", "3"], "--python-version '3': give MAJOR.MINOR"),
        (["--cluster", "local", "--glibc", "2.5"], "--glibc '2.5'"),
        (["--cluster", "local", "--extras", "mpi,cuda"], "--extras cuda: not an extra of eurotrain"),
        (["--cluster", "lumi-g", "--python-version", "3.11"],
         "lumi-g: no package index is known to serve a torch that works there"),
        (["--cluster", "local", "--torch-index", "ftp://x"], "--torch-index 'ftp://x'"),
        (["--cluster", "local", "--source", "/nonexistent"], "no eurotrain source tree"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_before_anything_runs(args, says, tmp_path, capsys, nothing_runs):
    out = tmp_path / "out"
    err = _refused(capsys, tmp_path, *args, "--output", str(out))
    assert says in err and err.startswith("eurotrain bundle: "), err
    assert not out.exists()


def test_output_must_be_new_or_empty(tmp_path, capsys, nothing_runs):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.whl").write_text("")
    err = _refused(capsys, tmp_path, "--cluster", "local", "--output", str(out))
    assert f"--output {out}: exists and is not an empty directory" in err


def test_wheels_dir_without_a_torch_for_the_target(tmp_path, capsys, nothing_runs):
    wheels = tmp_path / "wheels"
    _fake_wheel(wheels, "torch-2.13.0+rocm6.4-cp311-cp311-manylinux_2_28_aarch64.whl")
    _fake_wheel(wheels, "torch-2.13.0+rocm6.4-cp312-cp312-manylinux_2_28_x86_64.whl")
    err = _refused(
        capsys, tmp_path, "--cluster", "lumi-g", "--python-version", "3.11",
        "--output", str(tmp_path / "out"), "--wheels", str(wheels),
    )  # fmt: skip
    assert "no torch wheel for CPython 3.11 on x86_64" in err and "cp312" in err
    err = _refused(
        capsys, tmp_path, "--cluster", "lumi-g", "--python-version", "3.11",
        "--output", str(tmp_path / "out"), "--wheels", str(tmp_path / "missing"),
    )  # fmt: skip
    assert "not a directory" in err


def test_the_torch_in_wheels_is_chosen(tmp_path):
    wheels = tmp_path / "wheels"
    _fake_wheel(wheels, "torch-2.13.0+rocm6.4-cp311-cp311-manylinux_2_28_x86_64.whl")
    args = bundle.parser().parse_args(
        ["--cluster", "lumi-g", "--python-version", "3.11", "--output", str(tmp_path / "o"),
         "--wheels", str(wheels)]
    )  # fmt: skip
    p = bundle.plan(args)
    assert (p.torch, p.torch_from, p.arch) == ("2.13.0+rocm6.4", str(wheels), "x86_64")
    assert "manylinux2014_x86_64" in p.platforms() and p.platforms()[0] == "manylinux_2_28_x86_64"


def test_jupiter_is_aarch64_and_nvidia_machines_name_a_cuda_index(tmp_path):
    args = bundle.parser().parse_args(
        ["--cluster", "jupiter-booster", "--python-version", "3.12", "--output", str(tmp_path)]
    )
    p = bundle.plan(args)
    assert p.arch == "aarch64" and "cu12" in p.torch_from and p.torch == bundle.TORCH


# ---- the real thing: build for this machine, install with no index, train -------------------
def _local_torch_wheel() -> Path | None:
    """The wheel of the torch installed here, from pip's find-links (where this machine's
    venv got it): a CUDA torch from an index would be gigabytes."""
    dirs = os.environ.get("PIP_FIND_LINKS", "").split()
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                            capture_output=True, text=True).stdout  # fmt: skip
    dirs += [d for m in re.finditer(r"find-links='([^']*)'", listed) for d in m[1].split()]
    cp = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    for d in dirs:
        for wheel in Path(d.removeprefix("file://")).glob(f"torch-{torch.__version__}-{cp}-*.whl"):
            if wheel.name.endswith(f"_{platform.machine()}.whl"):
                return wheel
    return None


@pytest.mark.slow
def test_bundle_installs_offline_and_trains(tmp_path):
    wheel = _local_torch_wheel()
    if wheel is None or platform.machine() != "x86_64":
        pytest.skip(f"no local wheel of the installed torch {torch.__version__} for this x86_64 "
                    f"machine in pip's find-links (a download would be gigabytes)")  # fmt: skip
    here = tmp_path / "torch-wheel"
    here.mkdir()
    (here / wheel.name).symlink_to(wheel)
    out = tmp_path / "bundle"
    start = time.monotonic()
    built = subprocess.run(
        [sys.executable, "-m", "eurotrain", "bundle", "--cluster", "local", "--output", str(out),
         "--wheels", str(here)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    names = [p.name for p in (out / "wheels").iterdir()]
    assert all(n.endswith(".whl") for n in names), names  # nothing to build on the cluster
    assert any(n.startswith("eurotrain-") for n in names) and wheel.name in names
    built_s = time.monotonic() - start

    # A fresh venv from the base interpreter, no index, no config, nothing from this checkout.
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PIP_NO_INDEX": "1",
           "PIP_CONFIG_FILE": os.devnull, "PIP_NO_COMPILE": "1",
           "PYTHON": getattr(sys, "_base_executable", sys.executable)}  # fmt: skip
    venv = tmp_path / "venv"
    installed = subprocess.run(["bash", str(out / "install.sh"), str(venv)], env=env,
                               capture_output=True, text=True)  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert f"torch {torch.__version__}" in installed.stdout
    installed_s = time.monotonic() - start - built_s

    run = {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    trained = subprocess.run(
        [str(venv / "bin" / "eurotrain"), "train", "tiny", "--train.steps", "3",
         "--train.output_dir", str(tmp_path / "runs"), "--logging.progress", "lines"],
        cwd=tmp_path, env=run, capture_output=True, text=True,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert "step 3/3" in trained.stdout
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import eurotrain; print(eurotrain.__file__)"],
        cwd=tmp_path, env=run, capture_output=True, text=True,
    )  # fmt: skip
    assert where.stdout.startswith(str(venv)), where  # the installed copy, not this checkout
    print(f"bundle built in {built_s:.0f} s, installed in {installed_s:.0f} s")


def test_a_failed_download_leaves_no_bundle(tmp_path, capsys, monkeypatch):
    """pip's own failure is one line naming what failed, and the half-built output is gone."""

    def wheel_then_fail(args, what):
        if args[0] == "wheel":  # eurotrain's wheel builds; the first download fails
            Path(args[args.index("-w") + 1], "eurotrain-0.1.0-py3-none-any.whl").write_text("")
            return ""
        raise bundle.BundleError(f"{what} failed: ERROR: No matching distribution found for x")

    monkeypatch.setattr(bundle, "_pip", wheel_then_fail)
    out = tmp_path / "out"
    err = _refused(capsys, tmp_path, "--cluster", "local", "--output", str(out))
    assert "downloading torch==2.13.0 failed: ERROR: No matching distribution" in err
    assert not out.exists()
