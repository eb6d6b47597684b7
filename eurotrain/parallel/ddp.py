"""Pure data parallelism at DDP's cost: PyTorch's replicate() (DistributedDataParallel's reducer
on the module in place, so parameter names do not change) when the layout is replicas only.

FSDP2 over a replicate-only mesh would gather nothing but still run its per-parameter hooks and
copies; DDP's reducer all-reduces gradients in buckets while backward is still running. Gradients
are summed, not averaged (a comm hook without the division): the trainer already divides the
loss by the global token count, as under FSDP (fsdp.py).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable.replicate import replicate
from torch.nn.parallel import DistributedDataParallel

BUCKET_MB = 100
"""All-reduce bucket size (torchtitan's choice for its DDP path; DDP's default is 25)."""


def _sum_hook(group, bucket):  # type: ignore[no-untyped-def]
    """All-reduce a bucket of gradients as a sum (DDP's default hook divides by the world).
    Not annotated: DDP checks the annotations against the real classes, which this module's
    postponed (string) annotations are not."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    assert work is not None
    return work.get_future().then(lambda fut: fut.value()[0])


def apply_ddp(model: nn.Module, group: dist.ProcessGroup, device: torch.device) -> nn.Module:
    """Replicate ``model`` over ``group`` (may be called on the meta device: DDP starts at the
    first forward, after the parameters are materialised and initialised)."""
    # Buffers (RoPE tables) are computed identically on every rank: no broadcast per step
    # (forward_sync_buffers from torch 2.13 on, which deprecates broadcast_buffers).
    no_buffer_sync: dict[str, Any] = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else {"broadcast_buffers": False}
    )
    replicate(  # type: ignore[arg-type]
        model,
        process_group=group,
        device_id=device,
        bucket_cap_mb=BUCKET_MB,
        gradient_as_bucket_view=True,
        **no_buffer_sync,
    )
    model.register_comm_hook(group, _sum_hook)  # type: ignore[operator]
    return model
