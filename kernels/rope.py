"""Rotary position embedding (rotate-half convention) for q and k in Triton, with backward.

Why a kernel: the eager version splits, multiplies, concatenates and casts, allocating several
fp32 temporaries the size of q and k. Here one program handles one token of one tensor: it
loads that position's cos/sin row once and rotates every head in registers.

In place where safe. The forward writes the rotated values back into q and k when autograd
allows it (``ctx.mark_dirty`` tells autograd, which bumps their version counters so a stale
use of the unrotated q is caught at backward time instead of silently reading rotated data).
It is safe when q is an intermediate of the graph (not a leaf the user owns) and not a view
produced by a multi-output op such as ``split``/``chunk``/``unbind`` (autograd refuses in-place
changes to those). Otherwise, or when the last dim is strided, it writes a new tensor. Callers
must use the returned tensors; the inputs may or may not have been overwritten.

The backward is the inverse rotation (sin -> -sin), written to new tensors: the incoming
gradients belong to autograd and are not ours to overwrite.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eurotrain.kernels._runtime import next_power_of_2


@triton.jit
def _rope_kernel(
    X,
    OUT,
    COS,
    SIN,
    stride_xb,
    stride_xs,
    stride_xh,
    stride_ob,
    stride_os,
    stride_oh,
    stride_cb,
    stride_cs,
    seq_len,
    n_heads,
    half,
    SIN_SIGN: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    s = token % seq_len
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    col_mask = cols < half
    mask = (heads < n_heads) & col_mask
    row = b * stride_cb + s * stride_cs  # stride_cb is 0 when every row has the same positions
    cos = tl.load(COS + row + cols, mask=col_mask, other=0.0).to(tl.float32)
    sin = tl.load(SIN + row + cols, mask=col_mask, other=0.0).to(tl.float32) * SIN_SIGN
    x_ptr = X + b * stride_xb + s * stride_xs + heads * stride_xh + cols
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
    o_ptr = OUT + b * stride_ob + s * stride_os + heads * stride_oh + cols
    # Both halves are loaded before either is stored, so OUT may alias X.
    tl.store(o_ptr, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_ptr + half, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=mask)


def _rotate(
    x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool
) -> None:
    """Rotate x [B, S, H, D] into out (which may be x). Both need unit stride on D; cos/sin are
    [S, D/2] or [B, S, D/2] with equal strides."""
    batch, seq_len, n_heads, head_dim = x.shape
    half = head_dim // 2
    if batch * seq_len == 0 or n_heads == 0:
        return
    _rope_kernel[(batch * seq_len,)](
        x,
        out,
        cos,
        sin,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        cos.stride(0) if cos.dim() == 3 else 0,
        cos.stride(-2),
        seq_len,
        n_heads,
        half,
        SIN_SIGN=-1.0 if inverse else 1.0,
        BLOCK_H=next_power_of_2(n_heads),
        BLOCK_D=next_power_of_2(half),
        num_warps=4,
    )


def inplace_is_safe(t: torch.Tensor) -> bool:
    """Whether ``t`` may be overwritten by a custom Function that marks it dirty."""
    if t.stride(-1) != 1:
        return False
    if not (torch.is_grad_enabled() and t.requires_grad) or t.is_leaf:
        # Outside autograd, the tensor is the caller's own data: do not surprise them.
        return False
    if t._is_view():
        base = t._base
        if base is not None and base.is_leaf and base.requires_grad:
            return False  # autograd forbids in-place on a view of a leaf that requires grad
        meta = torch._C._autograd._get_creation_meta(t)
        return meta == torch._C._autograd.CreationMeta.DEFAULT
    return True


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class RotaryFunction(torch.autograd.Function):
    """Rotates one tensor. One Function per tensor, because autograd allows a Function that
    modifies a view in place to return only that one tensor."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inplace: bool
    ) -> torch.Tensor:
        src = _unit_last_stride(x)
        out = src if inplace else torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _rotate(src, out, cos, sin, inverse=False)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        grad = _unit_last_stride(grad)
        out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        _rotate(grad, out, cos, sin, inverse=True)
        return out, None, None, None


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    inplace: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton rotary embedding with the signature of ``reference.apply_rotary``.

    q: [B, S, Hq, D], k: [B, S, Hkv, D] (any strides), cos/sin: [S, D // 2], or [B, S, D // 2]
    for positions that differ per row (packed documents). ``inplace``:
    None decides per tensor with ``inplace_is_safe``; False never overwrites; True insists
    (and fails the way autograd does where that is not allowed). cos/sin get no gradient.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rotary: q and k must be [B, S, H, D], got {q.shape}, {k.shape}")
    batch, seq_len, _, head_dim = q.shape
    if k.shape[0] != batch or k.shape[1] != seq_len or k.shape[3] != head_dim or head_dim % 2:
        raise ValueError(f"apply_rotary: q {tuple(q.shape)} and k {tuple(k.shape)} do not match")
    table = (seq_len, head_dim // 2)
    if cos.shape not in (table, (batch, *table)) or sin.shape != cos.shape:
        raise ValueError(
            f"apply_rotary: cos/sin must be [{seq_len}, {head_dim // 2}] or [{batch}, {seq_len}, "
            f"{head_dim // 2}], got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    cos = _unit_last_stride(cos)
    sin = _unit_last_stride(sin)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    q_inplace = inplace_is_safe(q) if inplace is None else inplace
    k_inplace = inplace_is_safe(k) if inplace is None else inplace
    if (q_inplace and q.stride(-1) != 1) or (k_inplace and k.stride(-1) != 1):
        raise ValueError("apply_rotary: inplace=True needs q and k with unit stride on D")
    return (
        RotaryFunction.apply(q, cos, sin, q_inplace),
        RotaryFunction.apply(k, cos, sin, k_inplace),
    )
