"""What autograd keeps between a micro-batch's forward and its backward, tensor by tensor, for
eurotrain's Llama block (eurotrain/models/llama.py) and loss, by kernel set, precision, tensor /
sequence / context parallelism and activation checkpointing.

Counted from the code (and checked against real training steps, tests/plan):

- RMSNorm, PyTorch reference: the fp32 input (the residual stream itself when it is fp32, a copy
  otherwise), the normalised value in the input's dtype and one fp32 rstd per row; its output is
  kept by the linear layers that read it (a separate bf16 copy per layer under autocast).
  Triton kernel: the input and rstd. Sequence-parallel norms get DTensors and use the reference.
- RoPE keeps nothing (its tables are buffers); SDPA keeps q, k, v, its output and an fp32
  log-sum-exp per head and row; with GQA, k and v are repeated to every query head first (the
  repeats are what SDPA keeps). Under Ulysses the output is permuted back by a copy that wo keeps.
- SwiGLU, reference: both inputs and silu(a); Triton: both inputs; w2 keeps the product.
- Activation checkpointing keeps a block's input ("full"), plus the outputs of every matmul and of
  SDPA ("selective", eurotrain/parallel/ac.py); the block is recomputed in backward.
- A mixture-of-experts block's feed-forward: eurotrain/plan/moe.py.
- The loss: the fused, chunked linear + cross-entropy (kernels "triton", and always under tensor
  parallelism) computes the gradients in the forward and keeps d hidden and d weight; the
  reference ("torch", "compile") materialises the logits and keeps their fp32 log-softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

from eurotrain.kernels.cross_entropy import default_chunk_size
from eurotrain.models.config import ModelConfig
from eurotrain.plan import moe

FP32 = 4


@dataclass(frozen=True)
class Precision:
    """Byte sizes the run's precision policy gives each kind of tensor."""

    compute: int
    """Matmul outputs and activations: 2 (bf16 on GPUs) or 4 (fp32 on CPUs)."""
    residual: int
    """The residual stream: bf16 when FSDP2 casts the parameters, fp32 under autocast."""
    autocast: bool
    """Autocast (GPU without FSDP): fp32 weights and norms, a bf16 copy per linear input."""
    gathered_param: int
    """An unsharded (FSDP) or autocast-cast parameter: the compute dtype."""

    @classmethod
    def of(cls, bf16: bool, fsdp: bool) -> Precision:
        if not bf16:
            return cls(FP32, FP32, False, FP32)
        return cls(2, 2 if fsdp else FP32, not fsdp, 2)


@dataclass(frozen=True)
class Shape:
    """One micro-batch on one rank."""

    tokens: int
    """Tokens attention and the MLP see: micro-batch x seq_len / cp."""
    tp: int
    sequence_parallel: bool
    cp: int
    fused_ops: bool
    """RMSNorm, RoPE and SwiGLU run as fused kernels (Triton on a GPU, or compiled), saving
    less than the PyTorch references."""
    fused_loss: bool
    """The loss is the chunked linear + cross-entropy (kernels "triton", on any device, and
    always under tensor parallelism) rather than the reference that materialises the logits."""

    @property
    def residual_rows(self) -> int:
        return self.tokens // self.tp if self.sequence_parallel and self.tp > 1 else self.tokens


def _fused_norm(shape: Shape) -> bool:
    return shape.fused_ops and not (shape.tp > 1 and shape.sequence_parallel)


def _norm_saved(m: ModelConfig, shape: Shape, prec: Precision) -> int:
    rows, rstd = shape.residual_rows, shape.residual_rows * FP32
    if _fused_norm(shape):
        return rows * m.dim * prec.residual + rstd
    # reference: x.float() (the input itself when fp32), and the normalised x in x's dtype
    return rows * m.dim * (FP32 + prec.residual) + rstd


def linear_inputs(m: ModelConfig, shape: Shape, prec: Precision, readers: int) -> int:
    """The norm's output as the linear layers that read it keep it (gathered under SP)."""
    copies = readers if prec.autocast else 1
    return copies * shape.tokens * m.dim * prec.compute


def _attention_saved(m: ModelConfig, shape: Shape, prec: Precision) -> int:
    """The attention half of a block: its norm, q/k/v's input, q, k, v, SDPA's outputs."""
    assert m.head_dim is not None and m.num_kv_heads is not None
    t, c = shape.tokens, prec.compute
    q = m.num_heads * m.head_dim // shape.tp
    kv = m.num_kv_heads * m.head_dim // shape.tp
    kv_kept = q if m.num_heads != m.num_kv_heads else kv  # repeated to every query head
    attention = t * (2 * q + 2 * kv_kept) * c + t * (m.num_heads // shape.tp) * FP32
    if shape.cp > 1:
        attention += t * q * c  # the Ulysses all-to-all output, permuted back by a copy
    return _norm_saved(m, shape, prec) + linear_inputs(m, shape, prec, readers=3) + attention


def block_saved(m: ModelConfig, shape: Shape, prec: Precision, index: int = 0) -> int:
    """Bytes block ``index`` keeps for backward without activation checkpointing."""
    ffn_norm = _norm_saved(m, shape, prec)
    if m.is_moe_layer(index):
        return _attention_saved(m, shape, prec) + ffn_norm + moe.ffn_saved(m, shape, prec)
    t, c = shape.tokens, prec.compute
    ffn = m.ffn_dim // shape.tp
    swiglu = (2 if shape.fused_ops else 3) * t * ffn * c
    return (
        _attention_saved(m, shape, prec)
        + ffn_norm
        + linear_inputs(m, shape, prec, readers=2)
        + swiglu
        + t * ffn * c  # w2's input
    )


def block_input(m: ModelConfig, shape: Shape, prec: Precision) -> int:
    return shape.residual_rows * m.dim * prec.residual


def selective_saved(m: ModelConfig, shape: Shape, prec: Precision, index: int = 0) -> int:
    """Bytes a block keeps under selective checkpointing: its input, every matmul's output and
    SDPA's outputs (eurotrain/parallel/ac.py _SAVE_OPS)."""
    assert m.head_dim is not None and m.num_kv_heads is not None
    t, c = shape.tokens, prec.compute
    q = m.num_heads * m.head_dim // shape.tp
    kv = m.num_kv_heads * m.head_dim // shape.tp
    attention = t * (q + 2 * kv + m.dim) * c  # wq wk wv, wo (partial sums)
    if m.is_moe_layer(index):
        ffn = moe.ffn_selective_saved(m, shape, prec)
    else:
        ffn = t * (m.dim + 2 * (m.ffn_dim // shape.tp)) * c  # w2 (partial sums), w1 w3
    sdpa = t * q * c + t * (m.num_heads // shape.tp) * FP32
    return block_input(m, shape, prec) + attention + ffn + sdpa


def block_backward_workspace(
    m: ModelConfig, shape: Shape, prec: Precision, index: int = 0, ep: int = 1
) -> int:
    """Gradients of a block's activations alive at once in its backward: the MLP's three
    [tokens, ffn] gradients (d c, d a, d b), or the MoE's (eurotrain/plan/moe.py)."""
    if m.is_moe_layer(index):
        return moe.ffn_backward_workspace(m, shape, prec, ep)
    return 3 * shape.tokens * (m.ffn_dim // shape.tp) * prec.compute


@dataclass(frozen=True)
class Block:
    """One block of one micro-batch under the checkpointing mode that applies to it."""

    saved: int
    """Kept from its forward to its backward."""
    recompute: int
    """Rebuilt at the start of its backward (0 when it is not checkpointed)."""
    workspace: int = 0
    """Gradient temporaries of its backward."""


def block(
    m: ModelConfig, shape: Shape, prec: Precision, index: int, mode: str, every: int, ep: int = 1
) -> Block:
    """Block ``index`` (global: checkpointing picks every ``every``-th block, whatever the
    pipeline split; it decides whether the block is a mixture of experts, too)."""
    full = block_saved(m, shape, prec, index)
    workspace = block_backward_workspace(m, shape, prec, index, ep)
    if mode == "none" or index % every:
        return Block(full, 0, workspace)
    # The rebuilt attention norm keeps its input as it is when that is fp32 already, and that
    # input is the one the checkpoint kept: not a second copy.
    kept = block_input(m, shape, prec)
    shared = kept if prec.residual == FP32 and not _fused_norm(shape) else 0
    if mode == "full":
        return Block(kept, full - shared, workspace)
    # What the backward rebuilds: all it would have kept, less what selective checkpointing
    # cached (SDPA's outputs and the SwiGLU inputs w1 and w3 made).
    cached = _cached_and_kept(m, shape, prec, index)
    return Block(selective_saved(m, shape, prec, index), full - cached - shared, workspace)


def _cached_and_kept(m: ModelConfig, shape: Shape, prec: Precision, index: int) -> int:
    assert m.head_dim is not None
    t, c = shape.tokens, prec.compute
    q = m.num_heads * m.head_dim // shape.tp
    sdpa = t * q * c + t * (m.num_heads // shape.tp) * FP32
    if m.is_moe_layer(index):
        return sdpa + moe.ffn_cached_and_kept(m, shape, prec)
    return sdpa + 2 * t * (m.ffn_dim // shape.tp) * c


@dataclass(frozen=True)
class HeadActivations:
    """The final norm and the loss of one micro-batch on the last pipeline stage."""

    saved: int
    forward_peak: int
    """Temporaries while the loss runs in the forward (on top of ``saved``)."""
    backward_peak: int
    """Temporaries at the start of the backward (on top of ``saved``)."""


def head(m: ModelConfig, shape: Shape, prec: Precision) -> HeadActivations:
    vocab = m.vocab_size // shape.tp
    t = shape.tokens  # the loss sees every token of the micro-batch (gathered under SP)
    norm = _norm_saved(m, shape, prec)
    hidden = prec.compute if not prec.autocast else FP32  # the final norm's output
    weight = prec.gathered_param if not prec.autocast else FP32
    if shape.fused_loss:
        # Under autocast the loss casts both inputs to the compute dtype first (its gradient
        # matmuls write with out=, which autocast never casts): the copies live through its
        # forward, d hidden and d weight are made in the compute dtype and cast back to fp32
        # in the backward.
        cast = prec.compute if prec.autocast else 0
        grad_hidden = prec.compute if prec.autocast else hidden
        grad_weight = prec.compute if prec.autocast else weight
        saved = norm + t * m.dim * grad_hidden + vocab * m.dim * grad_weight
        rows = default_chunk_size(t, m.dim, vocab)
        logits = prec.compute
        # one chunk's logits and its fp32 statistics / gradient temporaries, the final norm's
        # output (and its cast)
        forward = rows * vocab * (logits + 2 * FP32) + t * m.dim * (hidden + cast)
        forward += vocab * m.dim * cast
        # AccumulateGrad copies d weight (the loss's context still holds it); under autocast
        # the casts back to fp32 are new tensors
        backward = vocab * m.dim * weight + (t * m.dim * FP32 if prec.autocast else 0)
        return HeadActivations(saved, forward, backward)
    logits = t * vocab * prec.compute
    log_softmax = t * vocab * FP32
    saved = norm + t * m.dim * prec.compute + log_softmax
    upcast = t * vocab * FP32 if prec.compute != FP32 else 0
    forward = logits + upcast
    # nll's gradient and log_softmax's, then the gradient in the compute dtype
    backward = 2 * t * vocab * FP32 + (logits if prec.compute != FP32 else 0)
    return HeadActivations(saved, forward, backward)
