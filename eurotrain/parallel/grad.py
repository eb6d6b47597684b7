"""Gradient-norm clipping that works on plain tensors and on sharded DTensor gradients."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Total L2 norm of all gradients (over every shard); scale them to ``max_norm`` if > 0."""
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if hasattr(total, "full_tensor"):  # a DTensor: reduce the partial norms across ranks
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total
