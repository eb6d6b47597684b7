"""Triton RMSNorm against the PyTorch reference: forward, both gradients, determinism."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_close

from eurotrain.kernels import reference
from eurotrain.kernels.rmsnorm import rms_norm

# 1376 and 5504 are 5504 / 4 and 11008 / 2: Llama-2-7B's ffn split by tensor parallelism.
SHAPES = [(4, 64), (2, 3, 1376), (3, 5504), (7, 96)]
DTYPES = [torch.float32, torch.bfloat16]


def _run(fn, x, w, dy):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w, 1e-6)
    y.backward(dy)
    return y, x.grad, w.grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(shape, dtype, device):
    x = torch.randn(shape, device=device).to(dtype)
    w = (torch.rand(shape[-1], device=device) + 0.5).to(dtype)
    dy = torch.randn(shape, device=device).to(dtype)
    y, dx, dw = _run(rms_norm, x, w, dy)
    y_ref, dx_ref, dw_ref = _run(reference.rms_norm, x, w, dy)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype)
    assert_close(dx, dx_ref, dtype)
    assert_close(dw, dw_ref, dtype)


def test_bf16_input_fp32_weight_promotes_like_reference(device):
    x = torch.randn(5, 1376, device=device).to(torch.bfloat16)
    w = torch.rand(1376, device=device) + 0.5
    dy = torch.randn(5, 1376, device=device)
    y, dx, dw = _run(rms_norm, x, w, dy)
    y_ref, dx_ref, dw_ref = _run(reference.rms_norm, x, w, dy)
    assert y.dtype == torch.float32 and dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    assert_close(y, y_ref, torch.bfloat16)
    assert_close(dx, dx_ref, torch.bfloat16)
    assert_close(dw, dw_ref, torch.bfloat16)


@pytest.mark.parametrize("layout", ["row_strided", "transposed"])
def test_non_contiguous_input(layout, device):
    if layout == "row_strided":  # a [B, S, D] slice of a wider activation: rows keep a stride
        x = torch.randn(2, 3, 200, device=device)[..., :136]
    else:  # last dim strided: the kernel must copy first
        x = torch.randn(2, 136, 3, device=device).transpose(1, 2)
    assert not x.is_contiguous()
    w = torch.rand(136, device=device) + 0.5
    dy = torch.randn(x.shape, device=device)
    for got, want in zip(_run(rms_norm, x, w, dy), _run(reference.rms_norm, x, w, dy)):
        assert_close(got, want, torch.float32)


def test_weight_gradient_is_deterministic(device):
    x = torch.randn(37, 1376, device=device)
    w = torch.rand(1376, device=device) + 0.5
    dy = torch.randn(37, 1376, device=device)
    first = _run(rms_norm, x, w, dy)[2]
    second = _run(rms_norm, x, w, dy)[2]
    assert torch.equal(first, second)


def test_wrong_weight_shape_is_a_value_error(device):
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm(torch.randn(2, 8, device=device), torch.ones(4, device=device), 1e-6)
