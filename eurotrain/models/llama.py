"""The Llama-family decoder in plain PyTorch.

No parallelism lives here: tensor, pipeline and data parallelism are applied from outside
(eurotrain/parallel/) following the plans declared at the bottom of this file. Head counts are
read from the weight shapes at run time, so a tensor-parallel shard of a layer runs unchanged.
Layers sit in a ModuleDict keyed by index, and the embedding, final norm and output projection may
be None, so a pipeline stage keeps only its own part with the parameter names unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from eurotrain.kernels import Ops, get_ops
from eurotrain.models.attention import AttentionMask, attention
from eurotrain.models.config import ModelConfig
from eurotrain.models.init import init_param
from eurotrain.models.moe import MoE, moe_layers
from eurotrain.models.rope import rope_tables

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Grouped-query attention (causal; within documents and a sliding window when masked)."""

    def __init__(self, cfg: ModelConfig, ops: Ops) -> None:
        super().__init__()
        assert cfg.head_dim is not None and cfg.num_kv_heads is not None
        self.head_dim = cfg.head_dim
        qkv_bias = cfg.qkv_bias or cfg.attention_bias
        self.wq = nn.Linear(cfg.dim, cfg.num_heads * cfg.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.dim, bias=cfg.attention_bias)
        # Qwen3: RMSNorm over each head's query and key (one weight shared by all heads).
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, ops) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, ops) if cfg.qk_norm else None
        self.ops = ops
        # Context parallelism (Ulysses) swaps this for a function that all-to-alls around it.
        self.sdpa = attention

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask | None = None,
    ) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q = self.wq(x).view(bsz, seq, -1, self.head_dim)
        k = self.wk(x).view(bsz, seq, -1, self.head_dim)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos.dim() == 2:
            # Tables shared by all rows may be longer than this sequence: under sequence
            # parallelism the caller only sees its shard, attention the whole (gathered) sequence.
            cos, sin = cos[:seq], sin[:seq]
        q, k = self.ops.apply_rotary(q, k, cos, sin)
        out = self.sdpa(q, k, v, mask)  # [B, S, H, D]
        return self.wo(out.reshape(bsz, seq, -1))


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask | None = None
) -> torch.Tensor:
    """Attention on [B, S, H, D] tensors (eurotrain.models.attention.attention)."""
    return attention(q, k, v, mask)


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(
        self, cfg: ModelConfig, ops: Ops, hidden_dim: int | None = None, bias: bool | None = None
    ) -> None:
        super().__init__()
        hidden = hidden_dim or cfg.ffn_dim
        bias = cfg.mlp_bias if bias is None else bias
        self.w1 = nn.Linear(cfg.dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=bias)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=bias)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.ops.swiglu(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    """Attention and a feed-forward: the dense SwiGLU (``feed_forward``) or, in a mixture-of-experts
    block, ``moe`` (router, experts, shared experts)."""

    def __init__(self, cfg: ModelConfig, ops: Ops, index: int = 0) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, ops)
        self.attention = Attention(cfg, ops)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, ops)
        self.feed_forward: nn.Module | None = None
        self.moe: MoE | None = None
        if cfg.is_moe_layer(index):
            n_shared = cfg.moe.num_shared_experts
            shared = (
                FeedForward(cfg, ops, n_shared * cfg.expert_ffn_dim, bias=False)
                if n_shared
                else None
            )
            self.moe = MoE(cfg, ops.swiglu, shared)
        else:
            self.feed_forward = FeedForward(cfg, ops)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask | None = None,
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        ffn = self.moe if self.moe is not None else self.feed_forward
        assert ffn is not None
        return x + ffn(self.ffn_norm(x))


class LinearCrossEntropy:
    """The model's loss: the summed token cross-entropy of output(h) against the labels (fp32),
    through the kernel set's fused, chunked linear + cross-entropy (the [tokens, vocab] logits
    are not materialised with the Triton kernels). Parallelisms that split the output projection
    replace ``Transformer.loss_fn`` with their own version of the same call."""

    def __init__(self, ops: Ops) -> None:
        self.ops = ops

    def __call__(self, h: torch.Tensor, output: nn.Linear, labels: torch.Tensor) -> torch.Tensor:
        return self.ops.linear_cross_entropy(
            h.flatten(0, 1), output.weight, labels.flatten(), IGNORE_INDEX, 0.0, "sum"
        )


class Transformer(nn.Module):
    """Token ids [B, S] -> logits [B, S, V] (or, given labels, the summed cross-entropy)."""

    rope_cos: torch.Tensor  # non-persistent buffers, registered in __init__
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.ops = get_ops(cfg.kernels)
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(cfg, self.ops, i) for i in range(cfg.num_layers)}
        )
        self.norm: RMSNorm | None = RMSNorm(cfg.dim, cfg.norm_eps, self.ops)
        self.output: nn.Linear | None = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.loss_fn = LinearCrossEntropy(self.ops)
        cos, sin = self._rope()
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def tie_weights(self) -> None:
        """With tie_embeddings, make the output projection use the embedding's parameter.

        Call again after anything that replaces parameters module by module: Module.to_empty()
        and tensor parallelism's distribute_module give each module its own new tensor, which
        silently unties the two (two matrices trained apart, one dropped on export)."""
        if self.cfg.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def is_tied(self) -> bool:
        """Whether the tie the config asks for holds (True for an untied config, or a pipeline
        stage without both ends)."""
        if not self.cfg.tie_embeddings or self.tok_embeddings is None or self.output is None:
            return True
        return self.output.weight is self.tok_embeddings.weight

    def _rope(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        assert c.head_dim is not None
        return rope_tables(c.head_dim, c.max_seq_len, c.rope_theta, c.rope_scaling, device)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialise every parameter (layout-independent) and rebuild the RoPE tables.

        Separate from __init__ so the model can be built on the meta device, sharded, moved
        to its device with to_empty(), and only then filled."""
        device = self.rope_cos.device
        cos, sin = self._rope(device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for layer in moe_layers(self).values():  # to_empty() left them uninitialised
            layer.expert_bias.zero_()
            layer.tokens_per_expert.zero_()
            layer.aux_loss_sum.zero_()
        c = self.cfg
        residual_std = c.init_std / math.sqrt(2 * c.num_layers)
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):
                init_param(p, name, seed, "ones")
            elif leaf == "bias":
                init_param(p, name, seed, "zeros")
            elif name.endswith(("wo.weight", "w2.weight", "experts.w2")):
                init_param(p, name, seed, "normal", residual_std)
            else:
                init_param(p, name, seed, "normal", c.init_std)

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens: [B, S] ids (or [B, S, D] hidden states on a later pipeline stage).

        positions index the RoPE tables: [S] for a context-parallel shard of a longer sequence,
        or [B, S] per row (packed documents, positions restarting at each document); default
        0..S-1. documents ([B, S_attn], optional): the document index of every token attention
        sees (the whole row, also when ``tokens`` is a context-parallel shard of it): attention
        then stays within documents. With labels, returns the summed token cross-entropy (fp32,
        from ``self.loss_fn``) so the trainer can normalise by the global token count; a
        pipeline stage without the output projection returns its hidden states either way."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if positions is None:  # attention takes the first rows it needs
            cos, sin = self.rope_cos, self.rope_sin
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        mask = None
        if documents is not None or self.cfg.sliding_window is not None:
            mask = AttentionMask(documents, self.cfg.sliding_window)  # made once, for all layers
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is None:
            return h
        if labels is not None:
            return self.loss_fn(h, self.output, labels)
        return self.output(h)


def build_model(cfg: ModelConfig, device: torch.device | str = "meta") -> Transformer:
    """Build the model's structure on ``device`` (meta by default: no memory, no init)."""
    with torch.device(device):
        return Transformer(cfg)
