"""A real SLURM for the launcher tests: launch/testing/slurm_local.sh (munged, slurmctld, two
slurmd emulating node1 and node2 on localhost). In CI (CI=true) a SLURM that cannot start fails
the tests; elsewhere they skip with the reason."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "testing" / "slurm_local.sh"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"SLURM is required in CI but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm() -> Iterator[dict[str, str]]:
    """Environment (SLURM_CONF, PYTHONPATH) for commands that talk to the test cluster."""
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(b)]
    if missing:
        _unavailable(f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        _unavailable("starting slurmd needs root")
    # Not under pytest's tmp dir: that is private to root (0700) and munged runs as `munge`.
    state = Path(tempfile.mkdtemp(prefix="eurotrain-slurm-"))
    start = subprocess.run(
        ["bash", str(SCRIPT), "start", str(state)], capture_output=True, text=True, timeout=120
    )
    if start.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop", str(state)], capture_output=True, timeout=60)
        _unavailable(f"slurm_local.sh start failed:\n{start.stdout}\n{start.stderr}")
    env = {
        **os.environ,
        "SLURM_CONF": str(state / "slurm.conf"),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    try:
        yield env
    finally:
        subprocess.run(
            ["bash", str(SCRIPT), "stop", str(state)], env=env, capture_output=True, timeout=120
        )
        shutil.rmtree(state, ignore_errors=True)
