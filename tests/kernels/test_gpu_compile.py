"""Every kernel compiles for sm_90, sm_80 and gfx90a (MI250X) without a GPU.

Catches what the interpreter lets through; see gpu_compile_check.py for what it does not prove.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from eurotrain.kernels._runtime import triton_importable

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(not triton_importable(), reason="no triton")
def test_kernels_compile_for_gpu_targets(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Its own cache: not ~/.triton (a HOME that is not writable, a stale cache from another run)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1]), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run(
        [sys.executable, str(HERE / "gpu_compile_check.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(" ok") == 21, out.stdout
