"""benchmarks/kernels.py keeps working: the no-GPU message (the --cpu-smoke run: test_gpu_suite)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


# The --cpu-smoke run end to end is tested through benchmarks/gpu_suite.sh
# (tests/test_gpu_suite.py), which runs it and checks its table: one run instead of two.
