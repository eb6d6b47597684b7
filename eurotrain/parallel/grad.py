"""Gradient-norm clipping over plain tensors and sharded DTensor gradients, across pipeline stages."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def _sq_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of all gradients, each counted once over every shard.

    Gradients are grouped by (mesh, placements): under tensor parallelism without FSDP some are
    DTensors (split weights) and some plain (replicated norms), which one foreach norm cannot mix.
    """
    groups: dict[tuple[Any, tuple[Any, ...]] | None, list[torch.Tensor]] = {}
    for g in grads:
        key = None
        if hasattr(g, "device_mesh"):  # a DTensor
            dt = cast("DTensor", g)
            key = (dt.device_mesh, tuple(dt.placements))
        groups.setdefault(key, []).append(g)
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for key, members in groups.items():
        norm = torch.nn.utils.get_total_norm(members, norm_type=2.0, foreach=True)
        if key is not None:  # a DTensor: reduce the partial norms across its mesh
            norm = cast("DTensor", norm).full_tensor()
        total = total + norm.float().pow(2)
    return total


def clip_grad_norm_(
    params: Iterable[torch.Tensor],
    max_norm: float,
    pp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Total L2 norm of all gradients (every shard, every pipeline stage); scale them to
    ``max_norm`` if > 0. ``pp_group``: sum the stages' squared norms over the pipeline ranks."""
    grads = [p.grad for p in params if p.grad is not None]
    sq = _sq_norm(grads)
    if pp_group is not None:
        dist.all_reduce(sq, group=pp_group)
    total = sq.sqrt()
    if max_norm > 0:
        # A scalar multiply per gradient: foreach ops cannot mix DTensors and plain tensors.
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return total
