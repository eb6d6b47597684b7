"""Triton SwiGLU against the PyTorch reference, including the halves of a fused gate_up."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_close

from eurotrain.kernels import reference
from eurotrain.kernels.swiglu import swiglu

SHAPES = [(4, 64), (2, 3, 1376), (3, 5504), (5, 1000)]
DTYPES = [torch.float32, torch.bfloat16]


def _run(fn, a, b, dc):
    a = a.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    c = fn(a, b)
    c.backward(dc)
    return c, a.grad, b.grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(shape, dtype, device):
    a = (torch.randn(shape, device=device) * 3).to(dtype)
    b = torch.randn(shape, device=device).to(dtype)
    dc = torch.randn(shape, device=device).to(dtype)
    got = _run(swiglu, a, b, dc)
    want = _run(reference.swiglu, a, b, dc)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert_close(g, w, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_halves_of_a_fused_projection(dtype, device):
    """gate_up.chunk(2, -1) gives row-strided views; gradients must land in the right half."""
    gate_up = (torch.randn(2, 3, 2 * 1376, device=device) * 2).to(dtype)
    dc = torch.randn(2, 3, 1376, device=device).to(dtype)
    grads = []
    for fn in (swiglu, reference.swiglu):
        x = gate_up.detach().clone().requires_grad_()
        a, b = x.chunk(2, dim=-1)
        assert not a.is_contiguous()
        fn(a, b).backward(dc)
        grads.append(x.grad)
    assert_close(grads[0], grads[1], dtype)


def test_mismatched_inputs_are_a_value_error(device):
    with pytest.raises(ValueError, match="must match"):
        swiglu(torch.randn(2, 8, device=device), torch.randn(2, 4, device=device))
