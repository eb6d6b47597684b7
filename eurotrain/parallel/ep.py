"""Mixture-of-experts blocks under expert parallelism (parallel.ep) and tensor parallelism.

Expert parallelism: ``ep`` is a sub-axis of dp_shard (mesh dims "dp_shard_mod_ep" x "ep"), so
it takes no ranks of its own: the ep ranks of a group hold different tokens, as any data ranks
do, and each holds num_experts / ep of every MoE block's experts (DTensors sharded on dim 0 over
the "ep" mesh). A block routes its own tokens, then (``AllToAllDispatch``):

1. the per-expert token counts are exchanged (all-to-all of [E] counts), which tells every rank
   how many rows it sends to and receives from each ep rank (one host read of the counts: the
   collective needs the split sizes on the host);
2. the rows, sorted by expert and so grouped by destination rank, go to their experts' ranks
   (all-to-all), are regrouped by local expert, run through the grouped matmul, put back in
   arrival order and return (the reverse all-to-all).

Both all-to-alls are differentiable: the backward of one is the other with the splits swapped.
Each rank's experts thus see the tokens of all ep ranks, and their gradients are complete over
the ep group; FSDP (eurotrain/parallel/fsdp.py) then shards and sums them over the remaining data
ranks (dp_shard / ep, cp and dp_replicate), whose tokens differ.

Tensor parallelism: every tp rank routes the same, full tokens (the sequence-parallel shard is
gathered first), and splits the experts' (and the shared experts') hidden size: w1 / w3 column-,
w2 row-parallel. The block's output is then a partial sum over the tp ranks, reduced back to the
sequence shard (reduce-scatter) or to a replicated tensor (all-reduce). Everything that flows
back from a partial output is partial too (the routing weights' gradient, so the router's and
the input's), so the input gradient is summed over the tp ranks on the way back, the router
weight's gradient by ``MoE.grad_sum``, and the aux loss, identical on every tp rank, sends
1 / tp of its gradient from each.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Placement,
    Replicate,
    Shard,
    distribute_tensor,
)

from eurotrain.models.llama import FeedForward
from eurotrain.models.moe import GroupedExperts, MoE, moe_layers
from eurotrain.parallel.collectives import all_to_all


class AllToAllDispatch:
    """``MoE.dispatch`` under expert parallelism: send each row to the rank of its expert, run
    the local experts, send the outputs back (same order as the rows came in)."""

    def __init__(self, experts: GroupedExperts, group: dist.ProcessGroup, ep: int) -> None:
        self.experts, self.group, self.ep = experts, group, ep

    def __call__(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ep = self.ep
        local = counts.numel() // ep  # experts per rank: rank r holds [r * local, (r+1) * local)
        # received[s, e]: rows rank s sends to this rank's local expert e.
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts.contiguous(), group=self.group)
        received = received.view(ep, local)
        # One host read of both: the split sizes of the row all-to-all live on the host.
        send, recv = torch.stack([counts.view(ep, local).sum(1), received.sum(1)]).tolist()
        rows = all_to_all(x, self.group, send, recv)
        # Arrived grouped by (source rank, local expert); the grouped matmul wants them by expert.
        expert = torch.arange(local, device=x.device).repeat(ep)
        order = torch.repeat_interleave(expert, received.flatten()).argsort(stable=True)
        out = self.experts(rows[order], received.sum(0))
        out = out[order.argsort()]  # back to arrival order
        return all_to_all(out, self.group, recv, send)


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; the gradient is summed over ``group`` (each rank holds a partial one)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _GradSum:
    """``MoE.grad_sum`` under tensor parallelism (a picklable callable, not a closure)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, _SumGradOverGroup.apply(t, self.group))


class _SumOver:
    """Sum a tensor (no gradient) over ``group``."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t, group=self.group)
        return t


def _distribute(
    module: nn.Module, name: str, mesh: DeviceMesh, placements: list[Placement]
) -> None:
    param = getattr(module, name)
    dt = distribute_tensor(param.data, mesh, placements)
    setattr(module, name, nn.Parameter(dt, requires_grad=param.requires_grad))


class _TPInput:
    """Forward pre-hook: the full tokens on every tp rank; their gradient (partial per rank) is
    summed over the tp ranks on the way back (reduce-scatter to the sequence shard, or
    all-reduce)."""

    def __init__(self, tp_mesh: DeviceMesh) -> None:
        self.mesh = tp_mesh

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        if not isinstance(x, DTensor):  # no sequence parallelism: replicated already
            x = DTensor.from_local(x, self.mesh, [Replicate()], run_check=False)
        full = x.redistribute(self.mesh, [Replicate()]).to_local(grad_placements=[Partial()])
        return (full, *args[1:])


class _TPOutput:
    """Forward hook: the partial sums of the tp ranks reduced to the sequence shard (sequence
    parallelism) or to the whole replicated tensor."""

    def __init__(self, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
        self.mesh = tp_mesh
        self.layout: Placement = Shard(1) if sequence_parallel else Replicate()

    def __call__(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        partial = DTensor.from_local(out, self.mesh, [Partial()], run_check=False)
        return partial.redistribute(self.mesh, [self.layout]).to_local()


def _experts_layout(ep: int, tp: int) -> tuple[list[str], dict[str, list[Placement]]] | None:
    """(mesh dims, placements per expert weight) of the experts, or None (not split)."""
    dims: list[str] = []
    w13: list[Placement] = []
    w2: list[Placement] = []
    if ep > 1:
        dims.append("ep")
        w13.append(Shard(0))
        w2.append(Shard(0))
    if tp > 1:
        dims.append("tp")
        w13.append(Shard(1))  # [E, F, D]: the hidden size F, column-parallel
        w2.append(Shard(2))  # [E, D, F]: row-parallel
    if not dims:
        return None
    return dims, {"w1": w13, "w3": w13, "w2": w2}


def apply_moe_parallel(
    model: nn.Module, mesh: DeviceMesh, ep: int, tp: int, cp: int, sequence_parallel: bool
) -> None:
    """Split every MoE block of ``model`` (a Transformer or a pipeline stage) over the "ep" and
    "tp" dims of ``mesh``, in place; parameter names unchanged. Call after apply_tp (which
    leaves MoE blocks alone) and before FSDP. Under context parallelism the aux loss counts the
    tokens of the whole micro-batch (summed over "cp")."""
    if cp > 1:
        for layer in moe_layers(model).values():
            layer.aux_counts_sum = _SumOver(mesh["cp"].get_group())
            layer.aux_split = cp
    layout = _experts_layout(ep, tp)
    if layout is None:
        return
    dims, placements = layout
    experts_mesh = mesh[tuple(dims)] if len(dims) > 1 else mesh[dims[0]]
    for layer in moe_layers(model).values():
        for name, where in placements.items():
            _distribute(layer.experts, name, experts_mesh, where)
        if ep > 1:
            layer.dispatch = AllToAllDispatch(layer.experts, mesh["ep"].get_group(), ep)
        if tp > 1:
            _apply_tp(layer, mesh["tp"], sequence_parallel)


def _apply_tp(layer: MoE, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    if layer.shared is not None:
        shared = cast(FeedForward, layer.shared)
        assert shared.w1.bias is None, "shared experts have no biases"
        for name, dim in (("w1", 0), ("w3", 0), ("w2", 1)):
            _distribute(getattr(shared, name), "weight", tp_mesh, [Shard(dim)])
        # The module keeps its parameter names; only its forward runs on the local slices.
        shared.forward = _SharedForward(shared)  # type: ignore[method-assign]
    layer.grad_sum = _GradSum(tp_mesh.get_group())
    layer.aux_grad_share = 1.0 / tp_mesh.size()
    layer.register_forward_pre_hook(_TPInput(tp_mesh))
    layer.register_forward_hook(_TPOutput(tp_mesh, sequence_parallel))


class _SharedForward:
    """A shared expert's forward under tensor parallelism: this rank's hidden slice (w1 / w3
    column-, w2 row-parallel), a partial sum of the output like the routed experts'."""

    def __init__(self, ffn: FeedForward) -> None:
        self.ffn = ffn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = (
            cast(DTensor, getattr(self.ffn, n).weight).to_local() for n in ("w1", "w2", "w3")
        )
        h = self.ffn.ops.swiglu(F.linear(x, w1), F.linear(x, w3))
        return F.linear(h, w2)


def expert_modules(model: nn.Module) -> list[nn.Module]:
    """Every MoE block's routed experts (FSDP shards them over their own data ranks)."""
    return [layer.experts for layer in moe_layers(model).values()]
