"""The mixture-of-experts feed-forward (eurotrain/models/moe.py) in the planner's terms: what
its forward keeps for backward, its backward's temporaries, and the time of expert
parallelism's all-to-alls.

Counted from the code, for one micro-batch of T tokens (the MoE sees every token of the
micro-batch, gathered under tensor parallelism), top-k routing over E experts of hidden size F
(split by tp), k T "rows" (a token's copy per chosen expert), dim D:

- the router keeps its input (the norm's output) and the fp32 scores [T, E]; top-k, the sort
  and the slot-to-token map keep three int64 [T k] index tensors; the routing weights are fp32
  ([T k], and [T] sums when renormalised);
- the experts keep their gathered input rows [T k, D], both SwiGLU inputs (and silu of the
  first with the reference kernel) and w2's input [T k, F];
- the combine keeps the experts' output in fp32 (for the weighting) and the weighted fp32 rows
  (``index_add_`` keeps its source), [T k, D] each;
- shared experts keep what a dense SwiGLU of num_shared_experts x F keeps;
- the aux loss keeps one fp32 sum per token.

Dropless routing with a balanced load is assumed: every expert (and every ep rank) gets k T / E
rows per E tokens. An unbalanced step gives the busiest ep rank more rows than that.
"""

from __future__ import annotations

from eurotrain.models.config import ModelConfig

# activations.py imports this module: reach its names through the module, at call time.
from eurotrain.plan import activations as act

INDEX = 8
"""int64 index tensors."""


def _rows(m: ModelConfig, shape: act.Shape) -> int:
    return shape.tokens * m.moe.top_k


def _shared_hidden(m: ModelConfig, shape: act.Shape) -> int:
    return m.moe.num_shared_experts * m.expert_ffn_dim // shape.tp


def _expert_bytes(prec: act.Precision) -> int:
    """The experts' rows: the compute dtype, except under autocast (a GPU without FSDP), where
    the gathered rows keep the fp32 residual stream's dtype and the weights are fp32; whether
    autocast lowers the grouped matmul is unmeasured, so fp32 (the safe side)."""
    return act.FP32 if prec.autocast else prec.compute


def ffn_saved(m: ModelConfig, shape: act.Shape, prec: act.Precision) -> int:
    """Bytes an MoE feed-forward keeps for backward (its input norm not included)."""
    t, c, d = shape.tokens, prec.compute, m.dim
    rows, f, fs = _rows(m, shape), m.expert_ffn_dim // shape.tp, _shared_hidden(m, shape)
    swiglu = 2 if shape.fused_ops else 3
    router = t * m.moe.num_experts * act.FP32 + 3 * rows * INDEX + rows * act.FP32
    if m.moe.norm_topk_prob and m.moe.top_k > 1:
        router += t * act.FP32
    experts = rows * d * _expert_bytes(prec) + (swiglu + 1) * rows * f * _expert_bytes(prec)
    combine = 2 * rows * d * act.FP32 + rows * act.FP32
    shared = (swiglu + 1) * t * fs * c
    aux = t * act.FP32 if m.moe.aux_loss_coef > 0 else 0
    readers = 1 + (2 if fs else 0)  # the router, the shared experts' w1 and w3
    return act.linear_inputs(m, shape, prec, readers) + router + experts + combine + shared + aux


def ffn_selective_saved(m: ModelConfig, shape: act.Shape, prec: act.Precision) -> int:
    """Matmul outputs selective checkpointing keeps (eurotrain/parallel/ac.py): the router's
    logits and the shared experts' three; the experts' grouped matmuls are recomputed."""
    t, c = shape.tokens, prec.compute
    return t * m.moe.num_experts * c + t * (2 * _shared_hidden(m, shape) + m.dim) * c


def ffn_cached_and_kept(m: ModelConfig, shape: act.Shape, prec: act.Precision) -> int:
    """What selective checkpointing caches that the block would have kept anyway: the shared
    experts' SwiGLU inputs."""
    return 2 * shape.tokens * _shared_hidden(m, shape) * prec.compute


def ffn_backward_workspace(m: ModelConfig, shape: act.Shape, prec: act.Precision, ep: int) -> int:
    """Gradients alive at once in an MoE feed-forward's backward, beyond the saved tensors it
    has freed by then: the combine's two fp32 [T k, D] (the rows' gradient and the weighting's
    product; the weighted rows are freed), or the experts' three [T k, F] like a dense MLP's,
    or the shared experts', or under expert parallelism an all-to-all's send and receive
    buffers of [T k, D]. These are alive one after the other, never together: the combine's
    gradient is the all-to-all's send buffer once its other temporaries are freed, and the
    received rows are the experts' output gradient (measured: with the buffers counted on top,
    ep 2 and 4 were over-predicted by 5-12 %)."""
    rows, c, d, f = _rows(m, shape), prec.compute, m.dim, m.expert_ffn_dim // shape.tp
    combine = 2 * rows * d * act.FP32
    experts = 3 * rows * f * _expert_bytes(prec)
    shared = 3 * shape.tokens * _shared_hidden(m, shape) * c
    a2a = all_to_all_buffers(m, shape, prec) if ep > 1 else 0
    return max(combine, experts, shared, a2a)


def all_to_all_buffers(m: ModelConfig, shape: act.Shape, prec: act.Precision) -> int:
    """One all-to-all's send and receive buffers: the [T k, D] rows each way."""
    return 2 * _rows(m, shape) * m.dim * prec.compute


def all_to_all_bytes(m: ModelConfig, tokens: int, ep: int, dtype_bytes: int) -> float:
    """Bytes one rank sends to the other ep ranks per MoE layer for ``tokens`` tokens: four
    all-to-alls (dispatch and combine, forward and backward) of the [tokens k, D] rows, of which
    (ep - 1) / ep leave the rank when the load is balanced."""
    if ep <= 1:
        return 0.0
    return 4 * tokens * m.moe.top_k * m.dim * dtype_bytes * (ep - 1) / ep
