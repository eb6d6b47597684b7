"""Fused linear + cross-entropy that never materialises the [tokens, vocab] logits.

Why: with a 128k vocabulary the logits of 8k tokens are 8192 x 128256 x 4 B = 4.2 GB in fp32,
plus their gradient, which is often the largest single allocation of a Llama step. Here the
tokens are processed in chunks: for each chunk the logits [chunk, V] are computed with one
matmul, the loss and the logit gradient are computed in that same buffer (a Triton kernel, or
plain torch when Triton cannot run), and the gradient is immediately pushed through the matmul
into d hidden (rows of this chunk) and d weight (accumulated). The chunk's buffer is then
reused. Peak extra memory is O(chunk x V) instead of O(N x V).

Because the gradients are computed during the forward, backward only scales them by the
incoming gradient (and by 1 / n_valid for "mean"). Costs of this design, stated plainly:
- the gradients are computed even if backward is never called (the wrapper skips them when
  autograd is off or nothing requires grad);
- d weight is accumulated in the weight's dtype, so bf16 weights see one bf16 rounding per
  chunk (like Liger-Kernel); fp32 weights accumulate in fp32;
- backward scales the stored gradients in place, so a second backward through the same graph
  (``retain_graph=True``) is refused with an error rather than returning wrong values.
"""

from __future__ import annotations

import math

import torch

from eurotrain.kernels._runtime import can_run_triton, next_power_of_2

REDUCTIONS = ("sum", "mean")


def default_chunk_size(num_tokens: int, hidden_dim: int, vocab_size: int) -> int:
    """Rows per chunk so that a chunk's logits are about as large as the whole hidden input.

    N * D / V rows of V logits hold N * D values. Rounded up to a power of two and at least 128
    so each chunk's matmul is still large enough to run near peak on a GPU.
    """
    rows = math.ceil(num_tokens * hidden_dim / max(vocab_size, 1))
    return max(1, min(num_tokens, max(128, next_power_of_2(rows))))


def ce_chunk_torch(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    compute_grad: bool,
) -> torch.Tensor:
    """Plain-torch twin of ``ce_kernel.ce_chunk_triton``: same contract, same formulas.

    Allocates a few fp32 [rows, V] temporaries, all bounded by the chunk.
    """
    x = logits.float()
    n_cols = x.shape[1]
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(x, dim=1)
    x_label = x.gather(1, safe_labels[:, None])[:, 0]
    loss = lse - (1.0 - label_smoothing) * x_label
    if label_smoothing:
        loss = loss - label_smoothing * x.mean(dim=1)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if compute_grad:
        grad = x.sub_(lse[:, None]).exp_()  # x is a fresh fp32 copy unless logits were fp32
        if label_smoothing:
            grad.sub_(label_smoothing / n_cols)
        grad.scatter_add_(
            1, safe_labels[:, None], torch.full_like(lse[:, None], -(1.0 - label_smoothing))
        )
        grad.mul_(valid[:, None])
        if grad.data_ptr() != logits.data_ptr():
            logits.copy_(grad)
    return loss


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
            need_hidden_grad,
            need_weight_grad,
        )
        ctx.reduction = reduction
        ctx.used = False
        ctx.save_for_backward(grad_hidden, grad_weight, num_valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.used:
            raise RuntimeError(
                "linear_cross_entropy: backward was run twice through the same graph; the fused "
                "kernel stores its gradients once. Recompute the loss instead of retain_graph."
            )
        ctx.used = True
        grad_hidden, grad_weight, num_valid = ctx.saved_tensors
        scale = grad_loss.float()
        if ctx.reduction == "mean":
            scale = scale / num_valid
        # In place: these buffers were made for this backward and are used nowhere else.
        if ctx.needs_input_grad[0]:
            grad_hidden.mul_(scale.to(grad_hidden.dtype))
        if ctx.needs_input_grad[1]:
            grad_weight.mul_(scale.to(grad_weight.dtype))
        return (
            grad_hidden if ctx.needs_input_grad[0] else None,
            grad_weight if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _chunked_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    chunk_size: int,
    use_triton: bool,
    need_hidden_grad: bool,
    need_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """The loss and, where asked for, the unscaled gradients, one chunk of tokens at a time."""
    if use_triton:
        from eurotrain.kernels.ce_kernel import ce_chunk_triton as ce_chunk
    else:
        ce_chunk = ce_chunk_torch
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
        h = hidden[start:end]
        logits = h @ weight.t()  # [chunk, V] in the input dtype, as the reference computes it
        loss_rows[start:end] = ce_chunk(
            logits, labels[start:end], ignore_index, label_smoothing, compute_grad
        )
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
) -> torch.Tensor:
    """Chunked fused version of ``reference.linear_cross_entropy`` (same signature and result).

    hidden: [N, D] or [..., D] (flattened), weight: [V, D], labels: [N] or [...].
    ``chunk_size``: tokens per chunk (default ``default_chunk_size``); the logits held at once
    are chunk_size x V. ``use_triton``: None picks Triton when it can run on these tensors.
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
    args = (
        hidden,
        weight,
        labels,
        ignore_index,
        label_smoothing,
        reduction,
        chunk_size,
        use_triton,
    )
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropyFunction.apply(*args)
    # No backward will come: skip the gradient matmuls (a third of the FLOPs each).
    return _chunked_forward(*args, need_hidden_grad=False, need_weight_grad=False)[0]
