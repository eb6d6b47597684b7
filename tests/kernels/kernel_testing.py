"""Shared helpers for the kernel tests: the stated tolerances and the comparison using them."""

from __future__ import annotations

import torch

# Tolerances, stated once (docs/kernels.md repeats them). Compared per element as
# |actual - expected| <= atol * max|expected| + rtol * |expected|: atol is relative to the
# largest value of the reference tensor, so one number serves tensors of any scale.
# fp32: the kernels differ from eager only in summation order and fused multiply-adds.
# bf16: both sides round to bf16 (8 bits of mantissa) at slightly different points; 2e-2
# allows about two bf16 ulps.
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2e-2, "atol": 1e-2},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Elementwise comparison with the tolerances of ``dtype`` (see TOLERANCES)."""
    tol = TOLERANCES[dtype]
    expected = expected.detach().float()
    actual = actual.detach().float()
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1e-12)
    )
