"""The fused linear + cross-entropy with the output projection split over the vocabulary.

Under tensor parallelism the output Linear is column-parallel: each of the tp ranks holds rows
[rank * V/tp, (rank + 1) * V/tp) of the [V, D] weight. ``vocab_parallel_linear_cross_entropy``
computes the loss of the whole vocabulary without gathering the weight or materialising the
logits (not even the vocabulary-sharded [N, V/tp] logits that ``loss_parallel`` needs): every
rank runs the chunked fused kernel of ``eurotrain.kernels.cross_entropy`` on its slice, and per
chunk of tokens the ranks exchange three fp32 numbers per token (their slice's log-sum-exp, the
label's logit if the label is theirs, the sum of their logits for label smoothing) in one
all-gather, from which every rank derives the same loss and its slice's logit gradient.

The gradients leave as DTensor expects them: d weight is this rank's shard; d hidden is this
rank's share of the sum over the vocabulary, summed over the tp ranks by DTensor in backward
(all-reduce for a replicated hidden, reduce-scatter back to the sequence shards for a
sequence-parallel one).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from eurotrain.kernels.cross_entropy import VocabShard, linear_cross_entropy

# all_gather_single is the name from torch 2.13 on (all_gather_into_tensor is deprecated there).
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    tp_mesh: DeviceMesh,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "sum",
    *,
    chunk_size: int | None = None,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` over the whole vocabulary, its weight split over
    the ranks of ``tp_mesh`` (1-D); the same value as ``linear_cross_entropy`` with the full
    weight, returned as a plain fp32 scalar identical on every tp rank.

    weight: a DTensor on ``tp_mesh`` placed Shard(0) (global [V, D], local [V/tp, D]), or a plain
        tensor that is already this rank's shard [V/tp, D] (rows rank * V/tp onwards).
    hidden: [..., D] on every rank: a plain tensor with the same value on every tp rank, or a
        DTensor on ``tp_mesh`` placed Replicate or sharded on a token dim (sequence parallel:
        Shard(1) of [B, S, D]); it is all-gathered for the loss, and its gradient
        reduce-scattered back.
    labels: a plain tensor of all the tokens' labels ([B, S] or [N]), the same on every tp rank.
    Every tp rank must call this with the same arguments: each chunk of tokens gathers once.
    Other arguments as ``eurotrain.kernels.cross_entropy.linear_cross_entropy``; ``chunk_size``
    counts tokens, each chunk holding [chunk_size, V/tp] logits.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"vocab_parallel_linear_cross_entropy: tp_mesh must be 1-D, got {tp_mesh}")
    if isinstance(labels, DTensor):
        raise ValueError(
            "vocab_parallel_linear_cross_entropy: labels must be a plain tensor of all the "
            f"tokens' labels on every tp rank, got a DTensor placed {labels.placements}"
        )
    local_weight = _local_weight(weight, tp_mesh)
    num_ranks = tp_mesh.size()
    shard = VocabShard(
        start=tp_mesh.get_local_rank() * local_weight.shape[0],
        size=num_ranks * local_weight.shape[0],
        gather_stats=functools.partial(
            _gather_stats, group=tp_mesh.get_group(), num_ranks=num_ranks
        ),
    )
    return linear_cross_entropy(
        _local_full_hidden(hidden, tp_mesh),
        local_weight,
        labels,
        ignore_index,
        label_smoothing,
        reduction,
        chunk_size=chunk_size,
        use_triton=use_triton,
        vocab_shard=shard,
    )


def _local_weight(weight: torch.Tensor, tp_mesh: DeviceMesh) -> torch.Tensor:
    """This rank's [V/tp, D] rows; through to_local, so d weight returns as the DTensor's grad."""
    if not isinstance(weight, DTensor):
        return weight
    if weight.device_mesh != tp_mesh or tuple(weight.placements) != (Shard(0),):
        raise ValueError(
            "vocab_parallel_linear_cross_entropy: weight must be a DTensor on the tp mesh placed "
            f"Shard(0) (ColwiseParallel), got mesh {weight.device_mesh} placed {weight.placements}"
        )
    if weight.shape[0] % tp_mesh.size():
        raise ValueError(
            f"vocab_parallel_linear_cross_entropy: vocabulary {weight.shape[0]} is not divisible "
            f"by tp={tp_mesh.size()}; choose a vocabulary size that is (pad it)"
        )
    return weight.to_local()


def _local_full_hidden(hidden: torch.Tensor, tp_mesh: DeviceMesh) -> torch.Tensor:
    """All the tokens' hidden states on this rank, as a plain tensor whose gradient (this rank's
    share of the vocabulary's) is summed over the tp ranks in backward."""
    if isinstance(hidden, DTensor):
        placement = hidden.placements[0] if hidden.device_mesh == tp_mesh else None
        if not (
            isinstance(placement, Replicate)
            or (isinstance(placement, Shard) and placement.dim % hidden.ndim != hidden.ndim - 1)
        ):
            raise ValueError(
                "vocab_parallel_linear_cross_entropy: a DTensor hidden must be on the tp mesh, "
                "placed Replicate or sharded on a token dim (Shard(1) for sequence parallel), got "
                f"mesh {hidden.device_mesh} placed {hidden.placements}"
            )
    else:
        # The same value on every rank. As a Replicate DTensor, its Partial gradient below is
        # all-reduced by DTensor in backward, out of place (the loss keeps its own buffer).
        hidden = DTensor.from_local(hidden, tp_mesh, (Replicate(),), run_check=False)
    return hidden.redistribute(tp_mesh, (Replicate(),)).to_local(grad_placements=(Partial(),))


def _gather_stats(stats: torch.Tensor, group: dist.ProcessGroup, num_ranks: int) -> torch.Tensor:
    """[3, rows] per rank -> [num_ranks, 3, rows], in rank order, on every rank."""
    out = stats.new_empty(num_ranks * stats.shape[0], stats.shape[1])
    _all_gather(out, stats.contiguous(), group=group)
    return out.view(num_ranks, *stats.shape)
