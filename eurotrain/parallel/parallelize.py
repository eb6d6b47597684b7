"""parallelize(): apply the layout to a model built on the meta device."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from eurotrain.configtools import ConfigError
from eurotrain.parallel.config import ParallelConfig
from eurotrain.parallel.dims import ParallelDims
from eurotrain.parallel.fsdp import apply_fsdp


def check_supported(dims: ParallelDims) -> None:
    unsupported = {k: v for k, v in (("tp", dims.tp), ("pp", dims.pp), ("cp", dims.cp)) if v > 1}
    if unsupported:
        names = ", ".join(f"parallel.{k}={v}" for k, v in unsupported.items())
        raise ConfigError(
            f"{names}: tensor, pipeline and context parallelism are not available in this "
            f"version; use data parallelism (parallel.dp_shard / parallel.dp_replicate)"
        )


def parallelize(
    model: nn.Module,
    dims: ParallelDims,
    mesh: DeviceMesh | None,
    cfg: ParallelConfig,
    param_dtype: torch.dtype,
) -> nn.Module:
    """Apply data parallelism (FSDP2 / HSDP) to the model; a no-op on one rank."""
    check_supported(dims)
    if mesh is None or dims.dp == 1:
        return model
    dp_mesh = mesh["dp_replicate", "dp_shard_cp"] if dims.dp_replicate > 1 else mesh["dp_shard_cp"]
    return apply_fsdp(
        model,
        dp_mesh,
        param_dtype=param_dtype,
        reduce_dtype=torch.float32,
        reshard_after_forward=cfg.reshard_after_forward,
    )
