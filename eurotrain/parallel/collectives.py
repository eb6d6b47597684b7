"""Differentiable collectives the parallel layers share."""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """All-to-all over dim 0; its gradient goes back the reverse way (splits swapped)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        group: dist.ProcessGroup,
        send: list[int] | None,
        recv: list[int] | None,
    ) -> torch.Tensor:
        ctx.group, ctx.send, ctx.recv = group, send, recv
        return _exchange(x, group, send, recv)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _exchange(grad, ctx.group, ctx.recv, ctx.send), None, None, None


def _exchange(
    x: torch.Tensor, group: dist.ProcessGroup, send: list[int] | None, recv: list[int] | None
) -> torch.Tensor:
    x = x.contiguous()  # before empty_like, which would copy a permuted input's strides
    out = torch.empty_like(x) if recv is None else x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x, recv, send, group=group)
    return out


def all_to_all(
    x: torch.Tensor,
    group: dist.ProcessGroup,
    send: list[int] | None = None,
    recv: list[int] | None = None,
) -> torch.Tensor:
    """Rows of ``x`` split ``send`` per rank of ``group`` (equal splits when None), ``recv`` rows
    from each rank back; differentiable (context parallelism's head/sequence exchange, expert
    parallelism's dispatch and combine)."""
    return cast(torch.Tensor, _AllToAll.apply(x, group, send, recv))
