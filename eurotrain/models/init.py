"""Layout-independent weight initialisation.

Each parameter is drawn from its own generator, seeded by (seed, parameter name), as the full
tensor; a sharded parameter (a DTensor under FSDP or TP) keeps only its own slice. The same seed
therefore gives the same weights whatever the parallel layout, which is what the parity tests and
bit-exact comparisons across layouts rest on.
"""

from __future__ import annotations

import hashlib

import torch


def name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)


def _local_slices(param: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]] | None:
    """(local tensor, slices of the global tensor it holds) for a DTensor, else None."""
    try:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    if not isinstance(param, DTensor):
        return None
    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    slices = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return param.to_local(), slices


@torch.no_grad()
def init_param(param: torch.Tensor, name: str, seed: int, kind: str, std: float = 0.0) -> None:
    """Fill ``param`` in place: kind "normal" (truncated at 3 std), "ones" or "zeros"."""
    local = _local_slices(param)
    target = local[0] if local else param
    if kind in ("ones", "zeros"):
        target.fill_(1.0 if kind == "ones" else 0.0)
        return
    assert kind == "normal", kind
    device = target.device
    gen = torch.Generator(device=device).manual_seed(name_seed(seed, name))
    full = torch.empty(tuple(param.shape), dtype=torch.float32, device=device)
    torch.nn.init.trunc_normal_(full, 0.0, std, -3 * std, 3 * std, generator=gen)
    if local:
        full = full[local[1]]
    target.copy_(full)
