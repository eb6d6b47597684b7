"""benchmarks/gpu_suite.sh, the one command for a GPU node, runs end to end on a CPU
(--cpu-smoke: tiny model, FP8 emulated, compile skipped) and appends one dated section."""

from __future__ import annotations

import subprocess
from datetime import date

import pytest
from multiproc import REPO

from eurotrain.kernels._runtime import triton_importable


@pytest.mark.slow
@pytest.mark.skipif(not triton_importable(), reason="the kernel benchmark needs triton")
def test_cpu_smoke_writes_one_section(tmp_path):
    pytest.importorskip("torchao.float8")
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--cpu-smoke", "--results",
         str(results)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    text = results.read_text()
    assert text.startswith("# Benchmark results\n")  # appended, nothing else touched
    assert text.count("## GPU suite") == 1
    assert (
        f"## GPU suite {date.today()}: CPU smoke run (checks the suite; not a measurement)" in text
    )
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    for name in ("bf16", "fp8 tensorwise"):
        assert "failed" not in rows[name] and "skipped" not in rows[name], rows[name]
    for name in ("bf16 + compile", "fp8 tensorwise + compile"):
        assert "skipped (cpu smoke" in rows[name]
    # The kernel benchmark's table: every op, eager and ours (this run is also the test of
    # `benchmarks/kernels.py --cpu-smoke` end to end).
    table = {
        tuple(line.split()[1:3]) for line in text.splitlines() if line.startswith("cpu-smoke ")
    }
    assert table == {
        (op, impl)
        for op in ("rms_norm", "apply_rotary", "swiglu", "linear_cross_entropy")
        for impl in ("eager", "ours")
    }, text
