"""Parallel layout configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from eurotrain.configtools import ConfigError


@dataclass
class ParallelConfig:
    """Degrees of each parallel axis; their product is the world size. -1 means "the rest"."""

    dp_replicate: int = 1
    """Data-parallel replicas (HSDP's replicate axis: full copies, gradients all-reduced)."""
    dp_shard: int = -1
    """Data-parallel shards (FSDP2: parameters, gradients and optimizer state sharded)."""
    cp: int = 1
    """Context parallel: each sequence split across this many ranks."""
    tp: int = 1
    """Tensor parallel (with sequence parallel): each layer's weights split across ranks."""
    pp: int = 1
    """Pipeline parallel: consecutive layers on consecutive ranks."""
    engine: Literal["fsdp", "deepspeed"] = "fsdp"
    """Data-parallel engine: PyTorch FSDP2 or DeepSpeed ZeRO."""
    reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after forward (ZeRO-3); false keeps them (ZeRO-2-like)."""

    def __post_init__(self) -> None:
        for key in ("dp_replicate", "dp_shard", "cp", "tp", "pp"):
            value = getattr(self, key)
            if value == 0 or value < -1:
                raise ConfigError(f"parallel.{key}: {value} must be a positive integer or -1")
        if sum(getattr(self, k) == -1 for k in ("dp_replicate", "dp_shard", "cp", "tp", "pp")) > 1:
            raise ConfigError("only one of parallel.dp_replicate/dp_shard/cp/tp/pp may be -1")
