"""SwiGLU gate, silu(a) * b, forward and backward in Triton.

Why a kernel: eager PyTorch writes silu(a) to memory, reads it back for the product, and keeps
it alive for backward. Here the forward reads a and b once and writes c; the backward
recomputes sigmoid(a) from the saved a and b instead of storing silu(a), trading a few
flops (free in a memory-bound op) for one [tokens, ffn] activation.

Inputs may be row-strided views, e.g. the two halves of a fused ``gate_up`` projection from
``chunk(2, dim=-1)``: rows are addressed with their own stride, so no copy is made.

Numerics: silu(a) is rounded to the input dtype before the product, as eager ``F.silu(a) * b``
does, so bf16 results agree with the reference to the last bit in most elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eurotrain.kernels._runtime import as_rows, interpret_mode, next_power_of_2


@triton.jit
def _swiglu_fwd_kernel(A, B, C, stride_a, stride_b, stride_c, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    a = tl.load(A + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (a * tl.sigmoid(a)).to(A.dtype.element_ty).to(tl.float32)
    tl.store(C + row * stride_c + cols, (silu * b).to(C.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DC,
    A,
    B,
    DA,
    DB,
    stride_dc,
    stride_a,
    stride_b,
    stride_da,
    stride_db,
    n_cols,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dc = tl.load(DC + row * stride_dc + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    silu = a * sig
    db = dc * silu.to(A.dtype.element_ty).to(tl.float32)
    # d silu / da = sig * (1 + a * (1 - sig))
    da = dc * b * sig * (1.0 + a * (1.0 - sig))
    tl.store(DA + row * stride_da + cols, da.to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + row * stride_db + cols, db.to(DB.dtype.element_ty), mask=mask)


def _block(n_cols: int) -> int:
    # The interpreter pays per program, a GPU per register: wide blocks only for the former.
    return min(next_power_of_2(n_cols), 8192 if interpret_mode() else 1024)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(
                f"swiglu: a and b must match, got {tuple(a.shape)} {a.dtype} and "
                f"{tuple(b.shape)} {b.dtype}"
            )
        a_rows, b_rows = as_rows(a), as_rows(b)
        n_rows, n_cols = a_rows.shape
        c = torch.empty((n_rows, n_cols), dtype=a.dtype, device=a.device)
        block = _block(n_cols)
        if c.numel() > 0:
            _swiglu_fwd_kernel[(n_rows, triton.cdiv(n_cols, block))](
                a_rows,
                b_rows,
                c,
                a_rows.stride(0),
                b_rows.stride(0),
                c.stride(0),
                n_cols,
                BLOCK=block,
                num_warps=4,
            )
        ctx.save_for_backward(a_rows, b_rows)
        ctx.shape = a.shape
        return c.view(a.shape)

    @staticmethod
    def backward(ctx, dc: torch.Tensor):
        a_rows, b_rows = ctx.saved_tensors
        dc_rows = as_rows(dc)
        n_rows, n_cols = a_rows.shape
        da = torch.empty((n_rows, n_cols), dtype=a_rows.dtype, device=a_rows.device)
        db = torch.empty_like(da)
        block = _block(n_cols)
        if da.numel() > 0:
            _swiglu_bwd_kernel[(n_rows, triton.cdiv(n_cols, block))](
                dc_rows,
                a_rows,
                b_rows,
                da,
                db,
                dc_rows.stride(0),
                a_rows.stride(0),
                b_rows.stride(0),
                da.stride(0),
                db.stride(0),
                n_cols,
                BLOCK=block,
                num_warps=4,
            )
        return da.view(ctx.shape), db.view(ctx.shape)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Triton silu(a) * b with the signature of ``reference.swiglu``; any leading shape."""
    return SwiGLUFunction.apply(a, b)
