"""Fused linear + cross-entropy that never materialises the [tokens, vocab] logits.

Why: with a 128k vocabulary the logits of 8k tokens are 8192 x 128256 x 4 B = 4.2 GB in fp32,
plus their gradient, which is often the largest single allocation of a Llama step. Here the
tokens are processed in chunks: for each chunk the logits [chunk, V] are computed with one
matmul, reduced per row to three numbers (log-sum-exp, the label's logit, the sum of logits),
from which the loss follows, and then overwritten with their gradient (Triton kernels, or
plain torch when Triton cannot run); the gradient is immediately pushed through the matmul
into d hidden (rows of this chunk) and d weight (accumulated). The chunk's buffer is then
reused. Peak extra memory is O(chunk x V) instead of O(N x V).

The weight may hold only a slice of the vocabulary (tensor parallelism splits the output
projection over the vocabulary): with a ``VocabShard`` the per-row numbers of every slice are
gathered and merged between the two steps, and the gradients returned are this slice's share
(d weight of the local rows, a partial d hidden to be summed over the slices). The
communication itself is the caller's (``eurotrain/parallel/loss.py``); this package never
imports torch.distributed.

Because the gradients are computed during the forward, backward only scales them by the
incoming gradient (and by 1 / n_valid for "mean"). Costs of this design, stated plainly:
- the gradients are computed even if backward is never called (the wrapper skips them when
  autograd is off or nothing requires grad);
- d weight is accumulated in the weight's dtype, so bf16 weights see one bf16 rounding per
  chunk (like Liger-Kernel); fp32 weights accumulate in fp32; under autocast both inputs are
  first cast to autocast's dtype, as it casts the reference's matmul;
- backward scales the stored gradients in place, once. A repeated backward through the same
  graph with the same incoming gradient returns the same gradients again (the weight pass of a
  zero-bubble pipeline schedule does exactly that); one with a different incoming gradient is
  refused with an error rather than returning wrong values.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from eurotrain.kernels._runtime import can_run_triton, next_power_of_2

REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True)
class VocabShard:
    """The weight holds vocabulary rows [start, start + its rows) of a vocabulary of ``size``.

    ``gather_stats`` takes this shard's per-row statistics [3, rows] (fp32) and returns those of
    every shard stacked, [num_shards, 3, rows], identical on every rank. Every rank holding a
    shard must call the loss with the same tokens and arguments, since each chunk gathers once.
    """

    start: int
    size: int
    gather_stats: Callable[[torch.Tensor], torch.Tensor]


def default_chunk_size(num_tokens: int, hidden_dim: int, vocab_size: int) -> int:
    """Rows per chunk so that a chunk's logits are about as large as the whole hidden input.

    N * D / V rows of V logits hold N * D values. Rounded up to a power of two and at least 128
    so each chunk's matmul is still large enough to run near peak on a GPU.
    """
    rows = math.ceil(num_tokens * hidden_dim / max(vocab_size, 1))
    return max(1, min(num_tokens, max(128, next_power_of_2(rows))))


def ce_chunk_stats_torch(
    logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, ignore_index: int
) -> torch.Tensor:
    """Plain-torch twin of ``ce_kernel.ce_chunk_stats_triton``: same contract, same formulas.

    Allocates a few fp32 [rows, n_cols] temporaries, all bounded by the chunk.
    """
    x = logits.float()
    local, held = _local_labels(labels, vocab_start, x.shape[1], ignore_index)
    x_label = torch.where(held, x.gather(1, local[:, None])[:, 0], 0.0)
    stats = torch.stack((torch.logsumexp(x, dim=1), x_label, x.sum(dim=1)))
    return torch.where(labels != ignore_index, stats, 0.0)  # zero ignored rows, as the kernel


def ce_chunk_grad_torch(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    vocab_start: int,
    vocab_size: int,
    ignore_index: int,
    label_smoothing: float,
) -> None:
    """Plain-torch twin of ``ce_kernel.ce_chunk_grad_triton``: overwrites ``logits``."""
    grad = logits.float().sub_(lse[:, None]).exp_()  # in place when the logits are fp32
    if label_smoothing:
        grad.sub_(label_smoothing / vocab_size)
    local, held = _local_labels(labels, vocab_start, grad.shape[1], ignore_index)
    one_hot = torch.where(held, -(1.0 - label_smoothing), 0.0)
    grad.scatter_add_(1, local[:, None], one_hot[:, None].to(grad.dtype))
    grad.mul_((labels != ignore_index)[:, None])
    if grad.data_ptr() != logits.data_ptr():
        logits.copy_(grad)


def _local_labels(
    labels: torch.Tensor, vocab_start: int, n_cols: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(column of each label in this slice, clamped to a valid index; whether it is here)."""
    local = labels - vocab_start
    held = (local >= 0) & (local < n_cols) & (labels != ignore_index)
    return torch.where(held, local, 0), held


def merge_shard_stats(gathered: torch.Tensor) -> torch.Tensor:
    """[num_shards, 3, rows] per-shard statistics -> [3, rows] over the whole vocabulary.

    log-sum-exps combine as M + log(sum exp(lse_s - M)) with M their max (no overflow); the
    label's logit is on one shard (zeros elsewhere) and the sums add.
    """
    lse = gathered[:, 0]
    top = lse.max(dim=0).values
    merged_lse = top + torch.log(torch.exp(lse - top).sum(dim=0))
    return torch.stack((merged_lse, gathered[:, 1].sum(dim=0), gathered[:, 2].sum(dim=0)))


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        ignore_index: int,
        label_smoothing: float,
        reduction: str,
        chunk_size: int,
        use_triton: bool,
        vocab_shard: VocabShard | None,
    ) -> torch.Tensor:
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, grad_hidden, grad_weight, num_valid = _chunked_forward(
            hidden,
            weight,
            labels,
            ignore_index,
            label_smoothing,
            reduction,
            chunk_size,
            use_triton,
            vocab_shard,
            need_hidden_grad,
            need_weight_grad,
        )
        ctx.reduction = reduction
        ctx.scaled_by = None
        ctx.save_for_backward(grad_hidden, grad_weight, num_valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight, num_valid = ctx.saved_tensors
        wanted = [
            g if needed else None
            for g, needed in zip((grad_hidden, grad_weight), ctx.needs_input_grad[:2])
        ]
        if ctx.scaled_by is None:
            scale = grad_loss.float()
            if ctx.reduction == "mean":
                scale = scale / num_valid
            for grad in wanted:
                if grad is not None:
                    # In place: these buffers were made for this backward. Through .data, so the
                    # saved tensors' version does not change and a repeated call (below) can
                    # still unpack them; ctx.scaled_by guards against scaling twice instead.
                    grad.data.mul_(scale.to(grad.dtype))
            ctx.scaled_by = grad_loss
        elif not _same_gradient(grad_loss, ctx.scaled_by):
            raise RuntimeError(
                "linear_cross_entropy: backward was run twice through the same graph with "
                "different incoming gradients; the fused kernel scaled its stored gradients in "
                "place by the first. Recompute the loss instead of retain_graph."
            )
        # A repeated call with the same incoming gradient (the weight pass of a zero-bubble
        # pipeline schedule, after its input pass) gets the already scaled gradients again.
        return (*wanted, None, None, None, None, None, None, None)


def _same_gradient(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))


def _chunk_ops(use_triton: bool) -> tuple[Callable, Callable]:
    """(statistics, gradient) functions for one chunk of logits."""
    if use_triton:
        from eurotrain.kernels.ce_kernel import ce_chunk_grad_triton, ce_chunk_stats_triton

        return ce_chunk_stats_triton, ce_chunk_grad_triton
    return ce_chunk_stats_torch, ce_chunk_grad_torch


def _chunked_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    chunk_size: int,
    use_triton: bool,
    vocab_shard: VocabShard | None,
    need_hidden_grad: bool,
    need_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """The loss and, where asked for, the unscaled gradients, one chunk of tokens at a time."""
    chunk_stats, chunk_grad = _chunk_ops(use_triton)
    vocab_start = vocab_shard.start if vocab_shard is not None else 0
    vocab_size = vocab_shard.size if vocab_shard is not None else weight.shape[0]
    num_tokens = hidden.shape[0]
    compute_grad = need_hidden_grad or need_weight_grad
    grad_hidden: torch.Tensor | None = None
    grad_weight: torch.Tensor | None = None
    if need_hidden_grad:
        grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    if need_weight_grad:
        grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    loss_rows = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
    for start in range(0, num_tokens, chunk_size):
        end = min(start + chunk_size, num_tokens)
        h, y = hidden[start:end], labels[start:end]
        logits = h @ weight.t()  # [chunk, V] in the input dtype, as the reference computes it
        stats = chunk_stats(logits, y, vocab_start, ignore_index)
        if vocab_shard is not None:
            stats = merge_shard_stats(vocab_shard.gather_stats(stats))
        lse, x_label, sum_x = stats.unbind(0)
        rows = lse - (1.0 - label_smoothing) * x_label - label_smoothing * sum_x / vocab_size
        loss_rows[start:end] = torch.where(y != ignore_index, rows, 0.0)
        if compute_grad:
            chunk_grad(logits, y, lse, vocab_start, vocab_size, ignore_index, label_smoothing)
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if grad_weight is not None:
            grad_weight.addmm_(logits.t(), h)
        del logits
    num_valid = (labels != ignore_index).sum()
    loss = loss_rows.sum()
    if reduction == "mean":
        loss = loss / num_valid  # nan when every label is ignored, as in PyTorch
    return loss, grad_hidden, grad_weight, num_valid


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "sum",
    *,
    chunk_size: int | None = None,
    use_triton: bool | None = None,
    vocab_shard: VocabShard | None = None,
) -> torch.Tensor:
    """Chunked fused version of ``reference.linear_cross_entropy`` (same signature and result).

    hidden: [N, D] or [..., D] (flattened), weight: [V, D], labels: [N] or [...].
    ``chunk_size``: tokens per chunk (default ``default_chunk_size``); the logits held at once
    are chunk_size x V. ``use_triton``: None picks Triton when it can run on these tensors.
    ``vocab_shard``: the weight is a slice of the vocabulary (see ``VocabShard``; use
    ``eurotrain.parallel.loss.vocab_parallel_linear_cross_entropy`` rather than this directly).
    The loss is then the whole vocabulary's, and d hidden only this slice's share of it.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(
            f"linear_cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}"
        )
    hidden_dim = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != hidden_dim:
        raise ValueError(
            f"linear_cross_entropy: weight {tuple(weight.shape)} does not match hidden dim {hidden_dim}"
        )
    if vocab_shard is not None and not (
        0 <= vocab_shard.start <= vocab_shard.start + weight.shape[0] <= vocab_shard.size
    ):
        raise ValueError(
            f"linear_cross_entropy: {weight.shape[0]} weight rows from {vocab_shard.start} do "
            f"not fit in a vocabulary of {vocab_shard.size}"
        )
    hidden = hidden.reshape(-1, hidden_dim)
    labels = labels.reshape(-1)
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"linear_cross_entropy: {labels.shape[0]} labels for {hidden.shape[0]} tokens"
        )
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], hidden_dim, weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    if use_triton is None:
        use_triton = can_run_triton(hidden)
    device_type = hidden.device.type
    autocast_dtype = _autocast_dtype(device_type)
    context: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if autocast_dtype is not None:
        # Under autocast the reference's logits matmul runs in the autocast dtype; the gradient
        # matmuls here write with out= or in place, which autocast never casts, so they would
        # meet mixed dtypes and fail. Cast both inputs the way autocast casts a matmul's
        # (autograd takes the gradients back to the inputs' dtypes) and run with autocast off.
        hidden = _autocast_cast(hidden, device_type, autocast_dtype)
        weight = _autocast_cast(weight, device_type, autocast_dtype)
        context = torch.autocast(device_type, enabled=False)
    args = (
        hidden,
        weight,
        labels,
        ignore_index,
        label_smoothing,
        reduction,
        chunk_size,
        use_triton,
        vocab_shard,
    )
    with context:
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return LinearCrossEntropyFunction.apply(*args)
        # No backward will come: skip the gradient matmuls (a third of the FLOPs each).
        return _chunked_forward(*args, need_hidden_grad=False, need_weight_grad=False)[0]


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls on ``device_type`` in, or None where it is off."""
    if not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast_cast(t: torch.Tensor, device_type: str, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as autocast would pass it to a matmul: floating tensors of the autocast device
    except fp64 are cast (the rule of torch.amp.autocast_mode._cast and ATen's autocast)."""
    if t.is_floating_point() and t.device.type == device_type and t.dtype is not torch.float64:
        return t.to(dtype)
    return t
