"""Model configuration: the shape of a Llama-family decoder (Llama 2/3, Mistral, Qwen2/3 style)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from eurotrain.configtools import ConfigError, divisors, shown

MAX_POSITIONS = 2**24
"""Longest context: the RoPE tables hold positions as fp32, which counts whole numbers exactly up
to 2**24 (16,777,216); past it two positions would share one rotation. The longest contexts of
supported HF models are a few million (Llama-3-Gradient-4194k: 2**22)."""
MAX_VOCAB = 2**32
"""Largest vocabulary: prepared shards store token ids as uint32 at most."""


@dataclass
class RopeScaling:
    """Llama-3.1 style frequency scaling of RoPE (HF ``rope_type: llama3``); factor 1 is off."""

    factor: float = 1.0
    """Context extension factor (8.0 for Llama 3.1); 1.0 disables scaling."""
    low_freq_factor: float = 1.0
    """Wavelengths longer than original_max_position_embeddings / low_freq_factor are scaled;
    > 0."""
    high_freq_factor: float = 4.0
    """Wavelengths shorter than original_max_position_embeddings / high_freq_factor are kept;
    > low_freq_factor when scaling is on (models/rope.py divides by their difference)."""
    original_max_position_embeddings: int = 8192
    """Context length the base model was trained with."""

    def __post_init__(self) -> None:
        if not self.factor >= 1.0:
            raise ConfigError(f"model.rope_scaling.factor: {self.factor} must be >= 1 (1 = off)")
        for key in ("low_freq_factor", "high_freq_factor"):
            if not getattr(self, key) > 0:  # models/rope.py divides by both
                raise ConfigError(
                    f"model.rope_scaling.{key}: {getattr(self, key)} must be > 0 (Llama 3.1 "
                    f"uses low_freq_factor 1 and high_freq_factor 4)"
                )
        if self.original_max_position_embeddings < 1:
            raise ConfigError(
                f"model.rope_scaling.original_max_position_embeddings: "
                f"{self.original_max_position_embeddings} must be >= 1 (8192 for Llama 3.1)"
            )
        if self.factor > 1.0 and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(
                f"model.rope_scaling: high_freq_factor ({self.high_freq_factor}) must exceed "
                f"low_freq_factor ({self.low_freq_factor})"
            )

    @property
    def enabled(self) -> bool:
        return self.factor != 1.0


@dataclass
class MoEConfig:
    """Mixture-of-experts feed-forward blocks (Mixtral, Qwen3-MoE, DeepSeek-V3 style routing);
    num_experts 0 keeps every block dense."""

    num_experts: int = 0
    """Routed experts per MoE block; 0 = no MoE (dense SwiGLU MLPs everywhere)."""
    top_k: int = 2
    """Experts each token is sent to (HF num_experts_per_tok)."""
    expert_ffn_dim: int | None = None
    """Hidden size of each expert's SwiGLU (HF moe_intermediate_size); null = model.ffn_dim."""
    num_shared_experts: int = 0
    """Experts every token goes through besides the routed ones (DeepSeek style), run as one
    SwiGLU of num_shared_experts x expert_ffn_dim."""
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    """Router scores: softmax over the experts (Mixtral, Qwen3-MoE) or a sigmoid each
    (DeepSeek-V3)."""
    norm_topk_prob: bool = True
    """Renormalise the top-k scores of a token to sum to 1 (Mixtral always; Qwen3-MoE's
    norm_topk_prob)."""
    route_scale: float = 1.0
    """Factor on the routing weights (DeepSeek-V3's routed_scaling_factor)."""
    aux_loss_coef: float = 0.0
    """Weight of the load-balancing loss E * sum_i f_i P_i (f_i: share of routed token slots,
    P_i: mean score of expert i; 1.0 when balanced), added to the training loss's gradient (the
    logged loss stays the cross-entropy); 0 = off. Mixtral used 0.02, Qwen3-MoE 0.001."""
    bias_update_rate: float = 0.0
    """Aux-loss-free balancing (DeepSeek-V3): after every step each expert's selection bias moves
    by this much towards balance (down when over-loaded, up when under-loaded); the bias only
    chooses experts, never weights them. 0 = off; DeepSeek-V3 used 0.001."""
    dense_layers: list[int] = field(default_factory=list)
    """Blocks that keep a dense SwiGLU of model.ffn_dim (HF mlp_only_layers; DeepSeek's first
    dense layers)."""
    every: int = 1
    """Every k-th block is MoE, counting from 1 (HF decoder_sparse_step)."""

    def __post_init__(self) -> None:
        if self.num_experts < 0:
            raise ConfigError(f"model.moe.num_experts: {self.num_experts} must be >= 0 (0 = off)")
        if not self.enabled:
            return
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(
                f"model.moe.top_k: {self.top_k} must be between 1 and model.moe.num_experts "
                f"({self.num_experts}): a token cannot go to more experts than exist"
            )
        if self.expert_ffn_dim is not None and self.expert_ffn_dim <= 0:
            raise ConfigError(f"model.moe.expert_ffn_dim: {self.expert_ffn_dim} must be > 0")
        for key in ("num_shared_experts", "aux_loss_coef", "bias_update_rate"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.moe.{key}: {getattr(self, key)} must be >= 0")
        if self.route_scale <= 0:
            raise ConfigError(f"model.moe.route_scale: {self.route_scale} must be > 0")
        if self.every < 1:
            raise ConfigError(f"model.moe.every: {self.every} must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0


@dataclass
class ModelConfig:
    """Shape and numerics of the decoder; presets for tiny .. 70B live in configs/."""

    name: str = "llama"
    """Free-form name written to metrics and checkpoints."""
    vocab_size: int = 320
    """Rows of the embedding; must be >= the tokenizer's vocabulary."""
    dim: int = 128
    """Hidden size (HF hidden_size)."""
    num_layers: int = 4
    """Transformer blocks (HF num_hidden_layers)."""
    num_heads: int = 4
    """Query heads (HF num_attention_heads)."""
    num_kv_heads: int | None = 2
    """Key/value heads for grouped-query attention; null means num_heads (plain MHA)."""
    head_dim: int | None = None
    """Per-head size; null means dim // num_heads."""
    ffn_dim: int = 384
    """Hidden size of the SwiGLU MLP (HF intermediate_size)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon; > 0."""
    rope_theta: float = 10000.0
    """RoPE base (500000 for Llama 3); > 0."""
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    """Llama-3.1 RoPE frequency scaling; factor 1 = off."""
    max_seq_len: int = 2048
    """Longest sequence the RoPE tables are built for."""
    tie_embeddings: bool = False
    """Share the input embedding with the output projection (Llama 3.2 1B/3B style)."""
    qkv_bias: bool = False
    """Bias on the q/k/v projections (Qwen2 style)."""
    attention_bias: bool = False
    """Bias on all four attention projections, q/k/v and the output (HF Llama's and Qwen3's
    attention_bias)."""
    mlp_bias: bool = False
    """Bias on the three projections of the SwiGLU MLP (HF Llama's mlp_bias)."""
    qk_norm: bool = False
    """RMSNorm over each head's query and key before RoPE (Qwen3), one weight of head_dim each."""
    sliding_window: int | None = None
    """Sliding-window attention (Mistral): a token attends to itself and the sliding_window - 1
    tokens before it, in every layer; null attends to the whole causal context."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-experts blocks; model.moe.num_experts 0 (default) = dense."""
    init_std: float = 0.02
    """Standard deviation of the (truncated) normal init of linear and embedding weights; > 0."""
    kernels: Literal["torch", "triton", "compile"] = "torch"
    """Implementation of RMSNorm, RoPE, SwiGLU and the loss: PyTorch references, fused Triton
    kernels (fall back to the references where Triton or a GPU is missing), or torch.compile."""

    def __post_init__(self) -> None:
        for key in ("vocab_size", "dim", "num_layers", "num_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, key)
            if value <= 0:
                raise ConfigError(f"model.{key}: {value} must be a positive integer")
        if self.max_seq_len > MAX_POSITIONS:
            raise ConfigError(
                f"model.max_seq_len: {self.max_seq_len} is more than the {MAX_POSITIONS:,} "
                f"positions the fp32 RoPE tables count exactly; set the context you train with"
            )
        if self.vocab_size > MAX_VOCAB:
            raise ConfigError(
                f"model.vocab_size: {self.vocab_size} is more than {MAX_VOCAB:,}, the ids that "
                f"prepared data (uint32) can hold"
            )
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_kv_heads: {self.num_kv_heads} must divide model.num_heads "
                f"({self.num_heads}); for example {', '.join(map(str, divisors(self.num_heads)))}"
            )
        if self.head_dim is None:
            if self.dim % self.num_heads:
                raise ConfigError(
                    f"model.dim ({self.dim}) is not divisible by model.num_heads "
                    f"({self.num_heads}): set model.head_dim explicitly or change num_heads"
                )
            self.head_dim = self.dim // self.num_heads
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim: {self.head_dim} must be even for RoPE")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(
                f"model.sliding_window: {self.sliding_window} must be >= 1 (null: no window)"
            )
        for key, default in (("norm_eps", "1e-5"), ("init_std", "0.02"), ("rope_theta", "10000")):
            if not getattr(self, key) > 0:  # written so that nan fails too
                raise ConfigError(
                    f"model.{key}: {getattr(self, key)} must be > 0 (the default is {default})"
                )
        bad = [i for i in self.moe.dense_layers if not 0 <= i < self.num_layers]
        if self.moe.enabled and bad:
            raise ConfigError(
                f"model.moe.dense_layers: {shown(bad)} are not blocks of this model "
                f"(0..{self.num_layers - 1})"
            )

    def is_moe_layer(self, index: int) -> bool:
        """Whether block ``index`` has a mixture of experts (HF Qwen3-MoE's rule)."""
        m = self.moe
        return m.enabled and index not in m.dense_layers and (index + 1) % m.every == 0

    @property
    def expert_ffn_dim(self) -> int:
        return self.moe.expert_ffn_dim or self.ffn_dim

    def _moe_params(self, active: bool) -> int:
        """Parameters of one MoE feed-forward: router, routed experts (only the top_k a token
        uses when ``active``), shared experts."""
        m = self.moe
        experts = m.top_k if active else m.num_experts
        n = (
            self.dim * m.num_experts
            + (experts + m.num_shared_experts) * 3 * self.dim * self.expert_ffn_dim
        )
        return n

    def num_params(self, exclude_embedding: bool = False, active: bool = False) -> int:
        """Parameter count of the decoder (the output projection counts unless tied); with
        ``active``, an MoE block counts only the experts one token passes through."""
        assert self.head_dim is not None and self.num_kv_heads is not None
        attn = self.dim * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias or self.attention_bias:
            attn += self.head_dim * (self.num_heads + 2 * self.num_kv_heads)
        if self.attention_bias:
            attn += self.dim
        if self.qk_norm:
            attn += 2 * self.head_dim
        mlp = 3 * self.dim * self.ffn_dim
        if self.mlp_bias:
            mlp += 2 * self.ffn_dim + self.dim
        n = self.dim
        for i in range(self.num_layers):
            ffn = self._moe_params(active) if self.is_moe_layer(i) else mlp
            n += attn + ffn + 2 * self.dim
        embed = self.vocab_size * self.dim
        if not exclude_embedding:
            n += embed
        if not self.tie_embeddings:
            n += embed
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 N (weights, fwd + bwd) + 12 L H D S (attention scores),
        as in the PaLM / Megatron MFU convention, with N excluding the input embedding; for a
        mixture of experts N counts the active parameters (the top_k experts a token uses)."""
        assert self.head_dim is not None
        n = self.num_params(exclude_embedding=True, active=True)
        if self.tie_embeddings:
            n += self.vocab_size * self.dim  # the output projection is still a matmul
        attn = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len
        return 6 * n + attn
