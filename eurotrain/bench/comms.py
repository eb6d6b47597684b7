"""Collective bandwidths, measured as nccl-tests measure them, on whatever backend the run has.

Every rank runs ``run_comms``. For each scope (``intra``: the ranks of one node, each node's group
at once; ``inter``: all ranks, when there are several nodes), each operation and each message
size, the ranks warm up, time ``iters`` calls back to back, and keep the slowest rank's mean time.
With ``bytes`` the per-rank message size as nccl-tests count it (the whole buffer an all-gather
fills, the whole buffer a reduce-scatter reduces) and n the ranks of the group:

    algbw = bytes / time
    busbw = algbw * factor, factor = 2 (n - 1) / n for all_reduce, (n - 1) / n for all_gather,
            reduce_scatter and all_to_all, 1 for send_recv (a ring: each rank sends to the next)

busbw is comparable with the hardware's link bandwidth whatever n is; ``busbw_fraction`` relates it
to the cluster profile's nominal per-GPU figure for that scope, where the profile has one.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from eurotrain.errors import ConfigError

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def bus_factor(op: str, n: int) -> float:
    if op == "all_reduce":
        return 2 * (n - 1) / n
    if op == "send_recv":
        return 1.0
    return (n - 1) / n


def parse_bytes(text: str) -> int:
    """'8K', '1M', '1G' or a plain number of bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*", text.upper())
    if not m or int(m.group(1)) < 1:
        raise ConfigError(f"message size {text!r}: use a byte count like 8K, 1M or 1G")
    return int(m.group(1)) * _UNITS[m.group(2)]


def size_range(spec: str) -> list[int]:
    """'8K:1G' -> 8 KiB, 32 KiB, ... (x4) up to 1 GiB; 'A,B,C' -> those sizes."""
    if ":" in spec:
        low, high = (parse_bytes(s) for s in spec.split(":", 1))
        if low > high:
            raise ConfigError(f"--sizes {spec!r}: the smallest size is larger than the largest")
        sizes = []
        size = low
        while size < high:
            sizes.append(size)
            size *= 4
        return [*sizes, high]
    return [parse_bytes(s) for s in spec.split(",")]


@dataclass
class Scope:
    name: str  # "intra" | "inter"
    group: Any  # a ProcessGroup (None: the world)
    ranks: int
    nodes: int


def node_name() -> str:
    """This rank's node: SLURM's name for it (emulated nodes share a host), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def scopes() -> list[Scope]:
    """The groups to measure: each node's ranks (intra) and all ranks (inter, several nodes)."""
    world = dist.get_world_size()
    names: list[Any] = [None] * world
    dist.all_gather_object(names, node_name())
    nodes = sorted(set(names), key=names.index)
    per_node = [[r for r in range(world) if names[r] == node] for node in nodes]
    out = []
    if len(nodes) == 1:
        return [Scope("intra", None, world, 1)]
    if len({len(p) for p in per_node}) == 1 and len(per_node[0]) > 1:
        mine, _ = dist.new_subgroups_by_enumeration(per_node)
        out.append(Scope("intra", mine, len(per_node[0]), 1))
    out.append(Scope("inter", None, world, len(nodes)))
    return out


def _call(op: str, group: Any, n: int, numel: int, dtype: torch.dtype, device) -> Callable:
    """A function running one ``op`` on buffers of ``numel`` elements (per nccl-tests' bytes)."""
    numel -= numel % n  # divisible buffers for the gathers and scatters
    full = torch.ones(numel, dtype=dtype, device=device)
    part = torch.ones(numel // n, dtype=dtype, device=device)
    if op == "all_reduce":
        return lambda: dist.all_reduce(full, group=group)
    if op == "all_gather":
        return lambda: dist.all_gather_into_tensor(full, part, group=group)
    if op == "reduce_scatter":
        return lambda: dist.reduce_scatter_tensor(part, full, group=group)
    if op == "all_to_all":
        out = torch.empty_like(full)
        return lambda: dist.all_to_all_single(out, full, group=group)
    assert op == "send_recv", op
    me = dist.get_group_rank(group, dist.get_rank()) if group is not None else dist.get_rank()
    peer = (lambda i: dist.get_global_rank(group, i)) if group is not None else (lambda i: i)
    recv = torch.empty_like(full)

    def ring() -> None:
        ops = [
            dist.P2POp(dist.isend, full, peer((me + 1) % n), group=group),
            dist.P2POp(dist.irecv, recv, peer((me - 1) % n), group=group),
        ]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    return ring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_op(fn: Callable, group: Any, device: torch.device, iters: int, warmup: int) -> float:
    """Mean seconds per call of the slowest rank of ``group``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    dist.barrier(group=group)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    mean = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64, device=device)
    dist.all_reduce(mean, op=dist.ReduceOp.MAX, group=group)
    return float(mean.item())  # a benchmark: waiting for the device is the point


def run_comms(
    sizes: list[int],
    ops: tuple[str, ...] = OPS,
    dtype: torch.dtype = torch.float32,
    iters: int = 20,
    warmup: int = 5,
    nominal: dict[str, float | None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Every rank calls this; returns the records (the same on every rank)."""
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available() and dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    element = torch.tensor([], dtype=dtype).element_size()
    records = []
    for scope in scopes():
        figure = (nominal or {}).get(scope.name)
        for op in ops:
            for size in sizes:
                fn = _call(op, scope.group, scope.ranks, max(1, size // element), dtype, device)
                seconds = time_op(fn, scope.group, device, iters, warmup)
                algbw = size / seconds / 1e9
                busbw = algbw * bus_factor(op, scope.ranks)
                records.append({
                    "op": op, "scope": scope.name, "nodes": scope.nodes, "ranks": scope.ranks,
                    "bytes": size, "dtype": str(dtype).removeprefix("torch."),
                    "time_s": seconds, "algbw_GBps": algbw, "busbw_GBps": busbw,
                    "nominal_GBps": figure,
                    "busbw_fraction": busbw / figure if figure else None,
                })  # fmt: skip
                if progress is not None:
                    progress(
                        f"{scope.name:5s} {op:14s} {size:>11,d} B  {seconds * 1e6:10.1f} us  "
                        f"busbw {busbw:8.3f} GB/s"
                    )
    return records
