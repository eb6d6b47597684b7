"""Cross-entropy loss and logit gradient for one chunk of rows, in Triton.

Used by ``cross_entropy.py`` on each [chunk, vocab] block of logits. Why a kernel: per row it
makes one pass for the online max / sum-exp (and the sum of logits label smoothing needs) and a
second pass that overwrites the logits with their gradient, so the chunk's logits buffer is
reused for the gradient and no softmax, log-softmax or one-hot tensor is allocated.

Per row, with lse = logsumexp(x), eps = label_smoothing, V = vocab size, y = label:
    loss   = lse - (1 - eps) * x[y] - eps * sum(x) / V
    dloss/dx[j] = softmax(x)[j] - eps / V - (1 - eps) * [j == y]
and both are zero for rows whose label is ignore_index. This is PyTorch's
``cross_entropy(..., label_smoothing=eps, reduction="sum")`` row by row; "mean" is applied
by the caller.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eurotrain.kernels._runtime import interpret_mode, next_power_of_2


@triton.jit
def _ce_chunk_kernel(
    LOGITS,
    LABELS,
    LOSS,
    stride_row,
    n_cols,
    ignore_index,
    label_smoothing,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_row
    label = tl.load(LABELS + row)
    offsets = tl.arange(0, BLOCK)
    if label == ignore_index:
        tl.store(LOSS + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, n_cols, BLOCK):
                cols = start + offsets
                zeros = tl.zeros([BLOCK], dtype=tl.float32)
                tl.store(row_ptr + cols, zeros.to(LOGITS.dtype.element_ty), mask=cols < n_cols)
    else:
        # Pass 1: online max and sum of exp (rescaled whenever the max grows), sum of logits.
        run_max = tl.full([], float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros([], dtype=tl.float32)
        sum_x = tl.zeros([], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offsets
            mask = cols < n_cols
            x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(run_max, tl.max(x, axis=0))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            sum_x += tl.sum(tl.where(mask, x, 0.0), axis=0)
            run_max = new_max
        lse = run_max + tl.log(run_sum)
        x_label = tl.load(row_ptr + label).to(tl.float32)
        loss = lse - (1.0 - label_smoothing) * x_label - label_smoothing * sum_x / n_cols
        tl.store(LOSS + row, loss)
        if COMPUTE_GRAD:
            # Pass 2: overwrite the logits with d loss / d logits.
            for start in range(0, n_cols, BLOCK):
                cols = start + offsets
                mask = cols < n_cols
                x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                grad = tl.exp(x - lse) - label_smoothing / n_cols
                grad = tl.where(cols == label, grad - (1.0 - label_smoothing), grad)
                tl.store(row_ptr + cols, grad.to(LOGITS.dtype.element_ty), mask=mask)


def ce_chunk_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    compute_grad: bool,
) -> torch.Tensor:
    """Per-row losses (fp32) of ``logits`` [rows, V]; overwrites logits with their gradient.

    ``logits`` must have unit stride on V. Labels outside [0, V) other than ignore_index are
    not checked (that would need a host sync per chunk) and read out of bounds.
    """
    n_rows, n_cols = logits.shape
    assert logits.stride(-1) == 1
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return loss
    # Wide blocks on the interpreter (each block is one numpy op); on a GPU a block is held in
    # registers, 4096 fp32 over 8 warps is 16 per thread. Untuned: no GPU was available.
    block = min(next_power_of_2(n_cols), 32768 if interpret_mode() else 4096)
    _ce_chunk_kernel[(n_rows,)](
        logits,
        labels,
        loss,
        logits.stride(0),
        n_cols,
        ignore_index,
        float(label_smoothing),
        COMPUTE_GRAD=compute_grad,
        BLOCK=block,
        num_warps=8,
    )
    return loss
