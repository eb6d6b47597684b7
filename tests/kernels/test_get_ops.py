"""get_ops: which implementation each kernel set resolves to, fallbacks, and their log line."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eurotrain.kernels import OP_NAMES, _runtime, get_ops, reference
from eurotrain.parallel.ac import inductor_cpu_problem

CPU_COMPILE = inductor_cpu_problem()  # a path with spaces or quotes breaks CPU compiling

REPO = Path(__file__).resolve().parents[2]


def test_torch_is_the_references():
    ops = get_ops("torch")
    assert ops.backend == "torch"
    assert ops.rms_norm is reference.rms_norm
    assert ops.describe() == {name: "torch" for name in OP_NAMES}


def test_unknown_name_is_a_value_error():
    with pytest.raises(ValueError, match="choose one of torch, triton, compile"):
        get_ops("cuda")


@pytest.mark.skipif(not _runtime.triton_importable(), reason="no triton")
def test_triton_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ops = get_ops("triton")
    assert ops.backend == "triton"
    assert ops.describe() == {name: "triton" for name in OP_NAMES}
    x = torch.randn(3, 40)
    w = torch.rand(40)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("cause", ["no_gpu", "no_triton"])
def test_fallback_says_why_once(cause, monkeypatch, caplog):
    if cause == "no_gpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        expected = "no GPU is visible"
    else:
        monkeypatch.setattr(_runtime, "triton_importable", lambda: False)
        expected = "triton is not importable"
    _runtime.reset_log_once()
    with caplog.at_level(logging.INFO, logger="eurotrain.kernels"):
        ops = get_ops("triton")
        get_ops("triton")
    assert ops.backend == "torch"
    assert ops.describe() == {
        "rms_norm": "torch",
        "apply_rotary": "torch",
        "swiglu": "torch",
        "linear_cross_entropy": "torch-chunked",
    }
    assert ops.rms_norm is reference.rms_norm
    messages = [r.getMessage() for r in caplog.records if expected in r.getMessage()]
    assert len(messages) == 1
    # The chunked CE still runs (in plain torch) and agrees with the reference.
    h, w, y = torch.randn(10, 8), torch.randn(300, 8), torch.randint(0, 300, (10,))
    torch.testing.assert_close(
        ops.linear_cross_entropy(h, w, y), reference.linear_cross_entropy(h, w, y)
    )


@pytest.mark.skipif(not _runtime.triton_importable(), reason="no triton")
def test_per_call_fallback_for_tensors_triton_cannot_take(monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ops = get_ops("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # now a CPU tensor cannot go to Triton
    _runtime.reset_log_once()
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    with caplog.at_level(logging.INFO, logger="eurotrain.kernels"):
        out = ops.swiglu(a, b)
        ops.swiglu(a, b)
    torch.testing.assert_close(out, reference.swiglu(a, b))
    assert [r.getMessage() for r in caplog.records] == [
        "eurotrain.kernels: swiglu got a cpu tensor; using the PyTorch reference"
    ]


def test_compile_is_lazy():
    ops = get_ops("compile")
    assert ops.backend == "compile"
    assert ops.swiglu.compiled is None  # nothing compiled until the first call
    # Importing the package and asking for the compile set pulls in neither Triton nor dynamo.
    code = (
        "import sys; from eurotrain.kernels import get_ops; get_ops('compile'); "
        "print('triton' in sys.modules, 'torch._dynamo' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "False"], out.stdout


@pytest.mark.slow
@pytest.mark.skipif(CPU_COMPILE is not None, reason=f"the trainer refuses it: {CPU_COMPILE}")
def test_compile_runs_and_matches_reference():
    ops = get_ops("compile")
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    torch.testing.assert_close(ops.swiglu(a, b), reference.swiglu(a, b))
    assert ops.swiglu.compiled is not None
