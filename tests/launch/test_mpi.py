"""`mpiexec -n 2 python -m eurotrain.train` bootstraps through mpi4py and trains."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _mpiexec() -> str | None:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def test_mpiexec_trains_tiny_model(tmp_path):
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install mpich mpi4py)")
    # Each rank writes what it detected to its own file (stdout lines would interleave).
    probe = (
        "import json, sys; from eurotrain.distributed import detect; d = detect(); "
        "open(f'{sys.argv[1]}/rank{d[0]}.json', 'w').write(json.dumps(d))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    seen = subprocess.run(
        [mpiexec, "-n", "2", sys.executable, "-c", probe, str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert seen.returncode == 0, seen.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks == [[0, 0, 2, "mpi"], [1, 1, 2, "mpi"]]

    out = subprocess.run(
        [mpiexec, "-n", "2", sys.executable, "-m", "eurotrain.train",
         str(REPO / "configs" / "tiny.yaml"), "--train.steps", "2",
         "--train.output_dir", str(tmp_path), "--train.run_name", "mpi"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "on 2 x cpu" in out.stdout
    metrics = [json.loads(x) for x in (tmp_path / "mpi" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
