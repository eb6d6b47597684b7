"""Rotary position embedding tables, with Llama-3.1 frequency scaling."""

from __future__ import annotations

import math

import torch

from eurotrain.models.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """The head_dim // 2 rotation frequencies, in fp32 (computed in fp64 for exactness)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling.enabled:
        return inv.float()
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv / scaling.factor + smooth * inv
    out = torch.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    out = torch.where(mid, blended, out)
    return out.float()


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, scaling: RopeScaling, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each [max_seq_len, head_dim // 2] in fp32."""
    inv = inverse_frequencies(head_dim, theta, scaling).to(device)
    pos = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(pos, inv)
    return angles.cos(), angles.sin()
