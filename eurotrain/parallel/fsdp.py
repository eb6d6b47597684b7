"""FSDP2 (fully_shard) per transformer block, HSDP when there is a replicate axis."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    experts: tuple[list[nn.Module], DeviceMesh] | None = None,
) -> nn.Module:
    """Shard each block, then the root (embedding, final norm and output).

    ``mesh`` is 1-D (FSDP) or 2-D (replicate, shard) for HSDP. Gradients are summed, not
    averaged: the trainer already divides the loss by the global token count.

    ``experts``: under expert parallelism, the MoE blocks' expert modules and their own data
    mesh (the ranks with the same experts, eurotrain/parallel/ep.py); each is sharded first, so
    its block leaves it out."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # OffloadPolicy() is fully_shard's default: no offloading.
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    layers = getattr(model, "layers", {})
    blocks = list(layers.values())
    inner = experts[0] if experts is not None else []
    for module in inner:
        assert experts is not None
        fully_shard(
            module,
            mesh=experts[1],
            reshard_after_forward=reshard_after_forward,
            mp_policy=mp,
            offload_policy=offload,
        )
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them.
        last = i == len(blocks) - 1
        fully_shard(
            block,
            mesh=mesh,
            reshard_after_forward=reshard_after_forward and not last,
            mp_policy=mp,
            offload_policy=offload,
        )
    fully_shard(
        model,
        mesh=mesh,
        reshard_after_forward=reshard_after_forward,
        mp_policy=mp,
        offload_policy=offload,
    )
    for module in [*inner, *blocks, model]:
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return model
