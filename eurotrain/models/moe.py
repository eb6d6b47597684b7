"""Mixture-of-experts feed-forward: a token-choice top-k router over grouped SwiGLU experts.

Dropless: every token reaches all of its top_k experts, however uneven the load. Tokens are
sorted by expert and each expert's rows run as one matmul (``torch.nn.functional.grouped_mm``
where the device and dtype have it, a loop over experts otherwise; both compute the same sums).

Balancing, two ways that may be combined:
- an auxiliary loss E * sum_i f_i P_i (Switch Transformer / Mixtral), whose gradient is added in
  backward without changing the value the model returns, so the logged loss stays the
  cross-entropy and a pipeline stage in the middle of the model can train it too;
- DeepSeek-V3's aux-loss-free bias: a per-expert bias added to the scores only to choose the
  experts, moved after each optimizer step towards balance by ``MoEBalance`` (callback).

Expert parallelism swaps ``MoE.dispatch`` for a version that all-to-alls the sorted tokens to the
ranks holding their experts and back; tensor parallelism sets ``grad_sum`` and ``aux_grad_share``,
context parallelism ``aux_counts_sum`` and ``aux_split`` (all in eurotrain/parallel/ep.py); the
model never sees a mesh.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eurotrain.models.config import ModelConfig


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor parameter (expert or tensor parallelism), else ``t``."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _grouped_mm_works(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether to call grouped_mm: it needs 16-byte aligned rows (bf16: sizes multiple of 8);
    on CUDA below SM90 the loop below computes the same products at the same cost.

    Why not on an A100 (SM80), although F.grouped_mm's docstring says bf16 inputs are expected
    on SM >= 80 (and the meta registration, _meta_grouped_mm_common, checks only the dtype): it
    runs there, but not as one kernel. ATen's _grouped_mm_cuda (cuda/GroupedBlas.cpp; the C++
    is not in the wheel) takes its CUTLASS grouped kernel (and, built with CUDA >= 13.3,
    cuBLASLt's) only on SM90/SM100; elsewhere _grouped_mm_fallback copies the offsets to the
    host (a sync) and runs one mm per group: what the loop does, one sync per call either way.
    ROCm reports capability 9.x for MI250X and MI300 and so takes grouped_mm: CK's kernel on
    gfx942/gfx950, elsewhere the same mm fallback, which ATen calls safe on any ROCm GPU.
    """
    if not hasattr(F, "grouped_mm") or x.dtype != w.dtype:
        return False
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    align = 16 // x.element_size()
    return x.shape[-1] % align == 0 and w.shape[-1] % align == 0 and w.shape[-2] % align == 0


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor):
    """Rows of ``x`` [T, in] sorted by group (``counts`` rows each, ``offsets`` their int32
    cumulative ends) times each group's ``w`` [G, out, in] transposed: [T, out]."""
    if _grouped_mm_works(x, w):
        return F.grouped_mm(x, w.transpose(-2, -1), offs=offsets)
    # One host read of the counts; a CPU run pays nothing for it, a GPU without grouped_mm does.
    sizes = counts.tolist()
    parts = [chunk @ w[g].t() for g, chunk in enumerate(torch.split(x, sizes))]
    return torch.cat(parts) if parts else x.new_zeros(0, w.shape[1])


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU MLPs stored as [E, ...] tensors: w2(silu(w1 x) * w3 x) each. Under
    expert parallelism the first dim holds only this rank's experts."""

    def __init__(self, num_experts: int, dim: int, hidden: int, swiglu: Callable) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.swiglu = swiglu

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``x``: rows sorted by expert, ``counts[e]`` rows for local expert e."""
        w1, w2, w3 = _local(self.w1), _local(self.w2), _local(self.w3)
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        h = self.swiglu(
            grouped_linear(x, w1, counts, offsets), grouped_linear(x, w3, counts, offsets)
        )
        return grouped_linear(h, w2, counts, offsets)


class _AuxLossGrad(torch.autograd.Function):
    """Identity on ``x`` in forward; in backward also sends ``scale`` as the gradient of ``aux``
    (so aux * scale is part of the loss whose gradient is computed, without being in its value)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        aux_grad = torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad.device)
        return grad, aux_grad, None


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _in_backward() -> bool:
    """True while autograd runs backward (activation checkpointing re-running a forward)."""
    return torch._C._current_graph_task_id() != -1


class MoE(nn.Module):
    """Router, routed experts and optional shared experts of one block."""

    expert_bias: torch.Tensor  # buffers, registered in __init__
    tokens_per_expert: torch.Tensor
    aux_loss_sum: torch.Tensor

    def __init__(self, cfg: ModelConfig, swiglu: Callable, shared: nn.Module | None) -> None:
        super().__init__()
        m = cfg.moe
        self.num_experts, self.top_k = m.num_experts, m.top_k
        self.score_func, self.norm_topk_prob = m.score_func, m.norm_topk_prob
        self.route_scale, self.aux_loss_coef = m.route_scale, m.aux_loss_coef
        self.router = nn.Linear(cfg.dim, m.num_experts, bias=False)
        self.experts = GroupedExperts(m.num_experts, cfg.dim, cfg.expert_ffn_dim, swiglu)
        self.shared = shared
        # Saved with the model: the balance the run has learned so far (aux-loss-free).
        self.register_buffer("expert_bias", torch.zeros(m.num_experts, dtype=torch.float32))
        # Tokens routed to each expert since the last optimizer step (this rank's micro-batches).
        self.register_buffer(
            "tokens_per_expert", torch.zeros(m.num_experts, dtype=torch.float32), persistent=False
        )
        # (sum over micro-batches of tokens x aux loss, tokens) since the last step, for the log.
        self.register_buffer("aux_loss_sum", torch.zeros(2, dtype=torch.float32), persistent=False)
        self.aux_loss_scale = 1.0
        """Factor on the aux loss's gradient: the engine sets 1 / (global label tokens) per step,
        times this micro-batch's token count below, the same normalisation as the cross-entropy."""
        self.dispatch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self.local_dispatch
        self.grad_sum: Callable[[torch.Tensor], torch.Tensor] = _identity
        """Applied to the router weight in forward. Tensor parallelism (eurotrain/parallel/ep.py)
        sets one that sums its gradient over the tp ranks, each of which holds a partial one."""
        self.aux_grad_share = 1.0
        self.aux_counts_sum: Callable[[torch.Tensor], torch.Tensor] = _identity
        self.aux_split = 1
        """Context parallelism (eurotrain/parallel/ep.py) splits each micro-batch over aux_split
        ranks, and sets aux_counts_sum to sum the per-expert counts over them: the aux loss is
        then the whole micro-batch's, as in one process."""
        """This rank's share of the aux loss's gradient: 1 / tp under tensor parallelism, whose
        ranks compute the same aux loss and sum their gradients."""

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, D] -> (expert ids [T, k], routing weights [T, k] fp32, scores [T, E] fp32)."""
        logits = F.linear(x, self.grad_sum(_local(self.router.weight))).float()
        scores = logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()
        # The bias only chooses (aux-loss-free balancing); the weights come from the scores.
        # A zero bias leaves the choice exactly as without one.
        idx = (scores + self.expert_bias).topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, idx)
        if self.norm_topk_prob:  # top-1 then weighs 1.0 (HF); Switch-style top-1: set it false
            weights = weights / weights.sum(-1, keepdim=True)
        return idx, weights * self.route_scale, scores

    def local_dispatch(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Run the experts on rows sorted by expert (all experts on this rank)."""
        return self.experts(x, counts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        idx, weights, scores = self.route(x)
        flat = idx.flatten()
        counts = torch.bincount(flat, minlength=self.num_experts)
        counting = self.training and not _in_backward()  # not again when checkpointing recomputes
        if counting:
            self.tokens_per_expert += counts.to(self.tokens_per_expert.dtype)
        order = flat.argsort(stable=True)
        rows = order // self.top_k  # the token each sorted slot came from
        out = self.dispatch(x[rows], counts)
        # Weight in fp32, sum each token's k slots back in the input's order.
        out = out.float() * weights.flatten()[order].unsqueeze(-1)
        y = torch.zeros(x.shape, dtype=out.dtype, device=x.device).index_add_(0, rows, out)
        y = y.to(x.dtype)
        if self.shared is not None:
            y = y + self.shared(x)
        if self.training and self.aux_loss_coef > 0 and torch.is_grad_enabled():
            aux, tokens = self.aux_loss(counts, scores)
            scale = self.aux_loss_coef * self.aux_loss_scale * self.aux_grad_share * tokens
            y = _AuxLossGrad.apply(y, aux, scale)
            if counting:  # for the log: summed over the ranks sharing the micro-batch, the
                # tokens add up to the micro-batch's once (aux_split ranks each add a share)
                # (no tensor from host values: a fill and scalar products, no copy to the device)
                one = aux.new_ones(())
                self.aux_loss_sum += torch.stack(
                    [aux.detach() * tokens, one * (tokens / self.aux_split)]
                )
        return y.view(shape)

    def aux_loss(self, counts: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(E * sum_i f_i P_i over this micro-batch's tokens, their number): f_i the share of
        the token slots routed to expert i (not differentiable), P_i the mean normalised score
        of expert i. When the micro-batch is split over ranks (context parallelism) f_i and the
        token count are those of the whole micro-batch (``aux_counts_sum``) while P_i sums only
        this rank's tokens, so the ranks' gradients add up to the whole micro-batch's."""
        tokens = scores.shape[0] * self.aux_split
        f = self.aux_counts_sum(counts.float()) / (tokens * self.top_k)
        p = (scores / scores.sum(-1, keepdim=True)).sum(0) / tokens
        return self.num_experts * (f * p).sum(), tokens


def moe_layers(model: nn.Module) -> dict[str, MoE]:
    """{module path: MoE} of a model (or pipeline stage), in order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def set_aux_loss_scale(layers: Iterable[MoE], scale: float) -> None:
    """The factor on the aux-loss gradient of ``layers`` (``moe_layers``) for the coming step."""
    for layer in layers:
        layer.aux_loss_scale = scale
