"""benchmarks/gpu_suite.sh, the one command for a GPU node, runs end to end on a CPU
(--cpu-smoke: tiny model, FP8 emulated, compile skipped) and appends one dated section; a failed
run is reported by its error line."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date

import pytest
from multiproc import REPO

from benchmarks.gpu_suite import _last_error
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
        env={**os.environ, "PYTHON": sys.executable},  # the suite's Python, whichever it is
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    text = results.read_text()
    assert text.startswith("# Benchmark results\n")  # appended, nothing else touched
    assert text.count("## GPU suite") == 1
    assert (
        f"## GPU suite {date.today()}: CPU smoke run (checks the suite; not a measurement)" in text
    )
    # The training runs take the GPU rows' path: Triton kernels under bf16 autocast.
    assert "--model.kernels triton --train.mixed_precision bf16" in text
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


def _failed(stdout: str, stderr: str) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(["python", "-m", "eurotrain.train"], 1, stdout, stderr)


def test_a_failed_run_is_reported_by_the_last_line_of_stderr() -> None:
    """The step lines go to stdout and come last; the error is the traceback's last line."""
    stderr = (
        "Traceback (most recent call last):\n"
        '  File "eurotrain/kernels/cross_entropy.py", line 238, in _chunked_forward\n'
        "RuntimeError: Expected out tensor to have dtype c10::BFloat16, but got float\n\n"
    )
    stdout = "eurotrain: llama3.2-1b on 1 x cuda\nstep 1/30 | loss 11.93 | step_time_s 0.41\n"
    assert _last_error(_failed(stdout, stderr)) == (
        "RuntimeError: Expected out tensor to have dtype c10::BFloat16, but got float"
    )


def test_without_stderr_the_last_line_of_stdout_then_the_exit_code() -> None:
    assert _last_error(_failed("step 1 | loss 2.0\nkilled | out of memory\n", "  \n")) == (
        "killed / out of memory"  # "|" would break the results table's row
    )
    assert _last_error(_failed("", "")) == "exit code 1"
    assert len(_last_error(_failed("", "x" * 500))) == 200
