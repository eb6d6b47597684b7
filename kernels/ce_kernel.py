"""Cross-entropy statistics and logit gradient for one chunk of rows, in Triton.

Used by ``cross_entropy.py`` on each [chunk, vocab] block of logits, in two kernels so that the
vocabulary may be split over tensor-parallel ranks: the first reduces each row to three numbers
(one pass, online max / sum-exp), the ranks combine those numbers, and the second overwrites the
logits with their gradient given the row's log-sum-exp over the whole vocabulary. Without a
split the second kernel follows the first directly. No softmax, log-softmax or one-hot tensor is
allocated; the chunk's logits buffer is reused for the gradient.

The logits held here are columns [vocab_start, vocab_start + n_cols) of a vocabulary of
vocab_size (vocab_start = 0 and n_cols = vocab_size without a split). Per row, with
lse = logsumexp over the whole vocabulary, eps = label_smoothing, V = vocab_size, y = label:
    loss        = lse - (1 - eps) * x[y] - eps * sum(x) / V
    dloss/dx[j] = exp(x[j] - lse) - eps / V - (1 - eps) * [j == y]
and both are zero for rows whose label is ignore_index. This is PyTorch's
``cross_entropy(..., label_smoothing=eps, reduction="sum")`` row by row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eurotrain.kernels._runtime import interpret_mode, next_power_of_2


@triton.jit
def _ce_stats_kernel(
    LOGITS,
    LABELS,
    STATS,
    stride_row,
    n_rows,
    n_cols,
    vocab_start,
    ignore_index,
    BLOCK: tl.constexpr,
):
    """STATS[:, row] = (logsumexp of the row, x[label] if the label is held here else 0,
    sum of the row); zeros for an ignored row."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_row
    label = tl.load(LABELS + row)
    offsets = tl.arange(0, BLOCK)
    lse = tl.zeros([], dtype=tl.float32)
    x_label = tl.zeros([], dtype=tl.float32)
    sum_x = tl.zeros([], dtype=tl.float32)
    if label != ignore_index:
        # Online max and sum of exp (rescaled whenever the max grows), and sum of logits.
        run_max = tl.full([], float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros([], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offsets
            mask = cols < n_cols
            x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(run_max, tl.max(x, axis=0))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            sum_x += tl.sum(tl.where(mask, x, 0.0), axis=0)
            run_max = new_max
        lse = run_max + tl.log(run_sum)
        local = label - vocab_start
        held = (local >= 0) & (local < n_cols)
        x_label = tl.load(row_ptr + tl.where(held, local, 0), mask=held, other=0.0).to(tl.float32)
    tl.store(STATS + row, lse)
    tl.store(STATS + n_rows + row, x_label)
    tl.store(STATS + 2 * n_rows + row, sum_x)


@triton.jit
def _ce_grad_kernel(
    LOGITS,
    LABELS,
    LSE,
    stride_row,
    n_cols,
    vocab_start,
    vocab_size,
    ignore_index,
    label_smoothing,
    BLOCK: tl.constexpr,
):
    """Overwrite the row's logits with d loss / d logits, given the row's log-sum-exp."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_row
    label = tl.load(LABELS + row)
    offsets = tl.arange(0, BLOCK)
    if label == ignore_index:
        for start in range(0, n_cols, BLOCK):
            cols = start + offsets
            zeros = tl.zeros([BLOCK], dtype=tl.float32)
            tl.store(row_ptr + cols, zeros.to(LOGITS.dtype.element_ty), mask=cols < n_cols)
    else:
        lse = tl.load(LSE + row)
        local = label - vocab_start  # outside [0, n_cols) when another rank holds the label
        for start in range(0, n_cols, BLOCK):
            cols = start + offsets
            mask = cols < n_cols
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - label_smoothing / vocab_size
            grad = tl.where(cols == local, grad - (1.0 - label_smoothing), grad)
            tl.store(row_ptr + cols, grad.to(LOGITS.dtype.element_ty), mask=mask)


def _block(n_cols: int) -> int:
    # Wide blocks on the interpreter (each block is one numpy op); on a GPU a block is held in
    # registers, 4096 fp32 over 8 warps is 16 per thread. Untuned: no GPU was available.
    return min(next_power_of_2(n_cols), 32768 if interpret_mode() else 4096)


def ce_chunk_stats_triton(
    logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, ignore_index: int
) -> torch.Tensor:
    """[3, rows] fp32: per row the log-sum-exp of ``logits`` [rows, n_cols], the logit of the
    label where vocab_start <= label < vocab_start + n_cols (else 0), and the sum of the logits.

    ``logits`` must have unit stride on the vocabulary. Labels are not range-checked (that
    would need a host sync per chunk); an out-of-range label reads as "held elsewhere".
    """
    n_rows, n_cols = logits.shape
    assert logits.stride(-1) == 1
    stats = torch.empty(3, n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return stats
    _ce_stats_kernel[(n_rows,)](
        logits,
        labels,
        stats,
        logits.stride(0),
        n_rows,
        n_cols,
        vocab_start,
        ignore_index,
        BLOCK=_block(n_cols),
        num_warps=8,
    )
    return stats


def ce_chunk_grad_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    vocab_start: int,
    vocab_size: int,
    ignore_index: int,
    label_smoothing: float,
) -> None:
    """Overwrite ``logits`` [rows, n_cols] with the gradient of the rows' loss, given ``lse``
    [rows] fp32, each row's log-sum-exp over the whole vocabulary of ``vocab_size``."""
    n_rows, n_cols = logits.shape
    assert logits.stride(-1) == 1
    if n_rows == 0:
        return
    _ce_grad_kernel[(n_rows,)](
        logits,
        labels,
        lse,
        logits.stride(0),
        n_cols,
        vocab_start,
        vocab_size,
        ignore_index,
        float(label_smoothing),
        BLOCK=_block(n_cols),
        num_warps=8,
    )
