"""RMSNorm forward and backward in Triton.

Why a kernel: eager PyTorch runs RMSNorm as five or six elementwise/reduction launches, each a
round trip through HBM, and autograd keeps the fp32 intermediates alive for backward. Here the
forward reads x and w once and writes y and one fp32 ``rstd`` per row; the backward reads
dy, x, w, rstd and writes dx plus per-program partial sums of dw.

Numerics follow ``reference.rms_norm`` (HF Llama): statistics in fp32, the normalised row is
rounded to x's dtype *before* the multiplication by the weight, and the output has the promoted
dtype of x and weight.

The weight gradient is a sum over all rows. Atomics would make it depend on the order programs
finish in; instead each program writes the partial sum of its own contiguous block of rows to
``partial[program]`` and ``partial.sum(0)`` adds them in a fixed order, so two runs on the same
device give bit-identical gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eurotrain.kernels._runtime import (
    as_rows,
    next_power_of_2,
    num_programs_for_rows,
    num_warps_for_block,
)


@triton.jit
def _rms_norm_fwd_kernel(
    X,
    W,
    Y,
    RSTD,
    stride_x,
    stride_y,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    # Round to x's dtype before scaling by w, as the reference (and HF Llama) does.
    x_hat = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (x_hat * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PARTIAL,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    rows_per_program,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        row64 = tl.cast(row, tl.int64)
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        x_hat = x * rstd
        # dw sees the rounded x_hat, exactly the tensor the forward multiplied w with.
        dw_acc += dy * x_hat.to(X.dtype.element_ty).to(tl.float32)
        g = dy * w
        # d/dx of x * rstd(x): rstd * (g - x_hat * mean(g * x_hat)).
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / n_cols))
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=mask)


class RMSNormFunction(torch.autograd.Function):
    """y = w * round(x * rsqrt(mean(x^2) + eps)) over the last dim; any leading shape."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        n_cols = x.shape[-1]
        if weight.shape != (n_cols,):
            raise ValueError(
                f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({n_cols},)"
            )
        x_rows = as_rows(x)
        weight = weight.contiguous()
        n_rows = x_rows.shape[0]
        y = torch.empty(
            (n_rows, n_cols), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device
        )
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = next_power_of_2(n_cols)
        if n_rows > 0:
            _rms_norm_fwd_kernel[(n_rows,)](
                x_rows,
                weight,
                y,
                rstd,
                x_rows.stride(0),
                y.stride(0),
                n_cols,
                eps,
                BLOCK=block,
                num_warps=num_warps_for_block(block),
            )
        ctx.save_for_backward(x_rows, weight, rstd)
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_rows, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x_rows.shape
        dy_rows = as_rows(dy)
        dx = torch.empty((n_rows, n_cols), dtype=ctx.x_dtype, device=x_rows.device)
        num_programs = num_programs_for_rows(x_rows.device, n_rows)
        partial = torch.empty((num_programs, n_cols), dtype=torch.float32, device=x_rows.device)
        block = next_power_of_2(n_cols)
        if n_rows > 0:
            _rms_norm_bwd_kernel[(num_programs,)](
                dy_rows,
                x_rows,
                weight,
                rstd,
                dx,
                partial,
                dy_rows.stride(0),
                x_rows.stride(0),
                dx.stride(0),
                n_rows,
                n_cols,
                triton.cdiv(n_rows, num_programs),
                BLOCK=block,
                num_warps=num_warps_for_block(block),
            )
        dw = partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.x_shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm with the signature of ``reference.rms_norm``."""
    return RMSNormFunction.apply(x, weight, eps)
