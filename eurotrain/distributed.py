"""Process-group bootstrap: who am I, how many are we, which device is mine.

Reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); with none
of it set, the run is a single process. Nothing happens at import.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    source: str
    """Where rank and world size came from: "torchrun" or "single"."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def detect() -> tuple[int, int, int, str]:
    """(rank, local_rank, world_size, source) from the environment."""
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if rank is not None and world is not None:
        return rank, _env_int("LOCAL_RANK") or 0, world, "torchrun"
    return 0, 0, 1, "single"


def pick_device(local_rank: int, device: str = "auto") -> torch.device:
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            f"train.device is {device!r} but no GPU is visible (torch.cuda.is_available() is "
            f"False): check CUDA_VISIBLE_DEVICES/ROCR_VISIBLE_DEVICES or set train.device cpu"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(
            f"local rank {local_rank} has no GPU: only {count} visible on this node. Start at "
            f"most {count} processes per node (--nproc-per-node {count})"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Initialise the default process group when there is more than one rank."""
    rank, local_rank, world, source = detect()
    dev = pick_device(local_rank, device)
    if world > 1 and not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise ValueError(
                    f"{var} is not set but WORLD_SIZE={world}: start through torchrun, or set "
                    f"MASTER_ADDR/MASTER_PORT to rank 0's address and a free port"
                )
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistInfo(rank, local_rank, world, dev, source)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
