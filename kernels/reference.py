"""Plain PyTorch reference implementations of the fused ops.

Every Triton kernel in this package has a twin here with the same signature; tests compare
the two, and the model falls back to these on CPU or where Triton is missing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32 and cast back to x's dtype (as HF Llama)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding in the rotate-half (HF / GPT-NeoX) convention.

    q: [B, S, Hq, D], k: [B, S, Hkv, D], cos/sin: [S, D // 2] (the same positions in every row)
    or [B, S, D // 2] (positions per row, e.g. restarting at every packed document), fp32.
    For i < D/2:
    out[i] = x[i] cos[i] - x[i + D/2] sin[i];  out[i + D/2] = x[i + D/2] cos[i] + x[i] sin[i].
    """
    c = cos[:, :, None, :] if cos.dim() == 3 else cos[None, :, None, :]
    s = sin[:, :, None, :] if sin.dim() == 3 else sin[None, :, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        return out.to(x.dtype)

    return rotate(q), rotate(k)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b, the gate of the Llama MLP."""
    return F.silu(a) * b


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against labels, materialising the logits.

    hidden: [N, D], weight: [V, D], labels: [N]. The logits are computed in fp32.
    reduction: "sum" (the trainer normalises by the global token count) or "mean" over the
    tokens whose label is not ignore_index.
    """
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(
        logits,
        labels,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )
