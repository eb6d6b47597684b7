"""benchmarks/kernels.py keeps working: the no-GPU message, and a --cpu-smoke run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eurotrain.kernels._runtime import triton_importable

REPO = Path(__file__).resolve().parents[2]


def _bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.kernels", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_a_gpu_it_says_so_and_exits_0():
    out = _bench()
    assert out.returncode == 0, out.stderr
    assert "needs a CUDA or ROCm GPU" in out.stdout


@pytest.mark.skipif(not triton_importable(), reason="no triton")
def test_cpu_smoke_runs_every_op(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = _bench("--cpu-smoke", "--out-dir", str(tmp_path), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    (report,) = tmp_path.glob("kernels_cpu-smoke_*.json")
    rows = json.loads(report.read_text())["rows"]
    assert {(r["op"], r["impl"]) for r in rows} == {
        (op, impl)
        for op in ("rms_norm", "apply_rotary", "swiglu", "linear_cross_entropy")
        for impl in ("eager", "ours")
    }
