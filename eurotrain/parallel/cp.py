"""Context parallelism on the "cp" mesh axis: each rank holds a contiguous slice of every
sequence.

Ulysses (any device): around attention, an all-to-all turns [B, S/cp, H, D] sequence shards into
[B, S, H/cp, D] head shards, attention runs on whole sequences for a subset of heads, and a
second all-to-all turns the result back. The model's ``Attention.sdpa`` is swapped for that
function and the model is given the global ``positions`` of its slice for RoPE. Attention sees
whole rows, so a document mask is built from the whole row's document ids (``documents``),
which every cp rank is given in full.

Ring (GPU only): PyTorch's ``context_parallel`` context shards the batch buffers and dispatches
SDPA to ring attention. Not verified here (no GPU); check_layout refuses it on CPU.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from eurotrain.models.attention import AttentionMask
from eurotrain.models.attention import attention as local_attention
from eurotrain.models.llama import TransformerBlock
from eurotrain.parallel.collectives import all_to_all


def _seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup, cp: int) -> torch.Tensor:
    """[B, s, H, D] (sequence slice, all heads) -> [B, cp*s, H/cp, D] (whole sequence)."""
    b, s, h, d = x.shape
    x = x.reshape(b, s, cp, h // cp, d).permute(2, 0, 1, 3, 4)  # [cp (head group), B, s, h, D]
    x = all_to_all(x, group)  # now dim 0 = the sequence slice each chunk came from
    return x.permute(1, 0, 2, 3, 4).reshape(b, cp * s, h // cp, d)


def _heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup, cp: int) -> torch.Tensor:
    """[B, S, h, D] (whole sequence, head group) -> [B, S/cp, cp*h, D] (sequence slice)."""
    b, seq, h, d = x.shape
    x = x.reshape(b, cp, seq // cp, h, d).permute(1, 0, 2, 3, 4)  # [cp (seq slice), B, s, h, D]
    x = all_to_all(x, group)  # now dim 0 = the head group each chunk came from
    return x.permute(1, 2, 0, 3, 4).reshape(b, seq // cp, cp * h, d)


def ulysses_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask | None,
    group: dist.ProcessGroup,
    cp: int,
) -> torch.Tensor:
    q, k, v = (_seq_to_heads(t, group, cp) for t in (q, k, v))
    return _heads_to_seq(local_attention(q, k, v, mask), group, cp)


def apply_ulysses(model: nn.Module, cp_mesh: DeviceMesh) -> nn.Module:
    fn = partial(ulysses_sdpa, group=cp_mesh.get_group(), cp=cp_mesh.size())
    for layer in cast(nn.ModuleDict, model.layers).values():
        cast(TransformerBlock, layer).attention.sdpa = fn
    return model


def shard_sequence(
    x: torch.Tensor, y: torch.Tensor, cp_mesh: DeviceMesh, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's contiguous slice of inputs and labels, and its positions for RoPE: the
    slice of ``positions`` ([B, S], per document) or the global positions 0..S-1 of the slice."""
    cp, rank = cp_mesh.size(), cp_mesh.get_local_rank()
    s = x.shape[1] // cp
    part = slice(rank * s, (rank + 1) * s)
    if positions is None:
        positions = torch.arange(rank * s, (rank + 1) * s, device=x.device)
    else:
        positions = positions[:, part]
    return x[:, part], y[:, part], positions


def ring_context(
    cp_mesh: DeviceMesh, x: torch.Tensor, y: torch.Tensor, positions: torch.Tensor
) -> contextlib.AbstractContextManager:
    """PyTorch ring attention: shards x, y and positions in place along the sequence (GPU)."""
    from torch.distributed.tensor.experimental import context_parallel

    return context_parallel(
        cp_mesh, buffers=[x, y, positions], buffer_seq_dims=[1, 1, 0], no_restore_buffers={x, y}
    )
