"""HF transformers interop: weight names and config for LlamaForCausalLM-family models.

Our layout keeps HF's rotate-half RoPE convention, so weights map one to one by name, with no
permutation of the q/k projections.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from eurotrain.models.config import ModelConfig, RopeScaling

_LAYER_MAP = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_OURS = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)$")
_THEIRS = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def to_hf_name(name: str) -> str:
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = _OURS.match(name)
    if not m or m.group(2) not in _LAYER_MAP:
        raise KeyError(f"no HF name for parameter {name!r}")
    return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"


def from_hf_name(name: str) -> str:
    for ours, theirs in _TOP_MAP.items():
        if name == theirs:
            return ours
    m = _THEIRS.match(name)
    inverse = {v: k for k, v in _LAYER_MAP.items()}
    if not m or m.group(2) not in inverse:
        raise KeyError(f"no eurotrain name for HF parameter {name!r}")
    return f"layers.{m.group(1)}.{inverse[m.group(2)]}.{m.group(3)}"


def to_hf_state_dict(state: dict[str, torch.Tensor], tie: bool) -> dict[str, torch.Tensor]:
    out = {to_hf_name(k): v for k, v in state.items()}
    if tie:
        out.pop("lm_head.weight", None)
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor], tie: bool) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue  # a buffer in old HF checkpoints; we recompute it
        out[from_hf_name(k)] = v
    if tie:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """A LlamaConfig dict (Qwen2-style qkv bias maps to attention_bias)."""
    # q/k/v biases without an o_proj bias is Qwen2's attention; HF Llama's attention_bias
    # would put a bias on o_proj too.
    arch, model_type = (
        ("Qwen2ForCausalLM", "qwen2") if cfg.qkv_bias else ("LlamaForCausalLM", "llama")
    )
    d: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
    }
    rs = cfg.rope_scaling
    if cfg.qkv_bias:
        d.pop("attention_bias")
        d.pop("mlp_bias")
        d["use_sliding_window"] = False
    if rs.enabled:
        d["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        }
    return d


def from_hf_config(d: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a HF config.json dict of a Llama-family model."""
    rs = d.get("rope_scaling") or (d.get("rope_parameters") or {})
    scaling = RopeScaling()
    if rs.get("rope_type", rs.get("type")) == "llama3":
        scaling = RopeScaling(
            factor=float(rs["factor"]),
            low_freq_factor=float(rs["low_freq_factor"]),
            high_freq_factor=float(rs["high_freq_factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
        )
    elif rs and rs.get("rope_type", rs.get("type")) not in (None, "default"):
        raise ValueError(f"unsupported HF rope_scaling {rs!r}: only 'llama3' and none are")
    theta = d.get("rope_theta", rs.get("rope_theta", 10000.0))
    return ModelConfig(
        name=d.get("_name_or_path") or d.get("model_type", "llama"),
        vocab_size=d["vocab_size"],
        dim=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        num_kv_heads=d.get("num_key_value_heads"),
        head_dim=d.get("head_dim"),
        ffn_dim=d["intermediate_size"],
        norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_seq_len=d.get("max_position_embeddings", 2048),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=bool(d.get("attention_bias", d.get("model_type") == "qwen2")),
    )
