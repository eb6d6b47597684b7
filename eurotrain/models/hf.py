"""HF transformers interop: weight names and config for the Llama-family causal LMs (Llama, Qwen2,
Qwen3, Mistral) and their mixture-of-experts relatives (Mixtral, Qwen3-MoE: models/hf_moe.py).

Our layout keeps HF's rotate-half RoPE convention, so weights map one to one by name, with no
permutation of the q/k projections.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from eurotrain.errors import CheckpointError, ConfigError
from eurotrain.models.config import ModelConfig
from eurotrain.models.hf_config import CAUSAL_LM, MOE_TYPES, from_hf_config
from eurotrain.models.hf_moe import (
    experts_from_hf,
    experts_to_hf,
    fused_hf_name,
    moe_hf_config,
    moe_model_type,
)
from eurotrain.models.llama import build_model

__all__ = [
    "from_hf_config",
    "from_hf_name",
    "from_hf_state_dict",
    "hf_model_type",
    "to_hf_config",
    "to_hf_name",
    "to_hf_state_dict",
]

_LAYER_MAP = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention.q_norm": "self_attn.q_norm",
    "attention.k_norm": "self_attn.k_norm",
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


def hf_model_type(cfg: ModelConfig) -> str:
    """The HF model_type whose modelling code computes what ``cfg`` describes: qwen3 for q/k
    norms, qwen2 for q/k/v biases alone, mistral for a sliding window, else llama. A
    ConfigError names what the closest HF model has no place for. A mixture of experts is
    qwen3_moe with q/k norms, else mixtral."""
    c = cfg
    if c.moe.enabled:
        return moe_model_type(c)
    if c.qk_norm:
        model_type = "qwen3"
    elif c.qkv_bias and not c.attention_bias:
        model_type = "qwen2"
    elif c.sliding_window is not None:
        model_type = "mistral"
    else:
        model_type = "llama"
    problems = []
    if c.qkv_bias and not c.attention_bias and model_type != "qwen2":
        problems.append("q/k/v biases without an o_proj bias (model.qkv_bias)")
    if c.attention_bias and model_type not in ("llama", "qwen3"):
        problems.append("model.attention_bias")
    if c.mlp_bias and model_type != "llama":
        problems.append("model.mlp_bias")
    if problems:
        raise ConfigError(
            f"model: {', '.join(problems)} has no place in HF's {CAUSAL_LM[model_type]} (the "
            f"closest HF model); export is refused rather than written as a different model"
        )
    return model_type


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


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF names for eurotrain weights; a tied model stores the embedding once (no lm_head)."""
    model_type = hf_model_type(cfg)  # refuses what HF's classes have no place for
    tie = cfg.tie_embeddings
    experts: dict[str, torch.Tensor] = {}
    if model_type in MOE_TYPES:
        experts, state = experts_to_hf(state, model_type)
    unknown = [k for k in state if not _has_hf_name(k)]
    if unknown:
        raise CheckpointError(
            f"model weights {_some(unknown)} have no HF name: not a eurotrain Llama-family model"
        )
    if tie and "output.weight" in state and "tok_embeddings.weight" in state:
        out_w, emb = state["output.weight"], state["tok_embeddings.weight"]
        if out_w.shape != emb.shape or not torch.equal(out_w, emb):
            raise CheckpointError(
                "model.tie_embeddings is true but output.weight differs from "
                "tok_embeddings.weight (saved by a run whose tie came apart): exporting it "
                "tied would drop the trained output matrix; export it untied (--untie)"
            )
    out = {to_hf_name(k): v for k, v in state.items()}
    out.update(experts)
    if tie:
        out.pop("lm_head.weight", None)
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """eurotrain weights from HF's, strictly: every HF tensor is used and every parameter of the
    model ``cfg`` describes is filled, with its shape; anything else is a CheckpointError
    naming the tensors."""
    expected = {k: tuple(v.shape) for k, v in build_model(cfg, "meta").state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    if cfg.moe.enabled:  # the experts first: several HF tensors make one of ours
        out, state = experts_from_hf(state, cfg, hf_model_type(cfg))
    unknown = []
    for k, v in state.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue  # a buffer in old HF checkpoints; we recompute it
        name = _from_hf_name_or_none(k)
        if name is None or name not in expected:
            unknown.append(k)
        else:
            out[name] = v
    if unknown:
        raise CheckpointError(
            f"HF weights: {len(unknown)} tensor(s) a {cfg.name!r} eurotrain model has no place "
            f"for: {_some(unknown)}; the weights are not those of a plain "
            f"{CAUSAL_LM[hf_model_type(cfg)]} as config.json describes it"
        )
    if cfg.tie_embeddings and "tok_embeddings.weight" in out:
        lm_head = out.pop("output.weight", None)  # some tied exports store it anyway
        emb = out["tok_embeddings.weight"]
        if lm_head is not None and (lm_head.shape != emb.shape or not torch.equal(lm_head, emb)):
            raise CheckpointError(
                "HF weights: tie_word_embeddings is true but lm_head.weight differs from "
                "model.embed_tokens.weight; set tie_word_embeddings false in config.json to "
                "import both matrices"
            )
        out["output.weight"] = emb
    missing = [_hf_label(k) for k in expected if k not in out]
    if missing:
        raise CheckpointError(f"HF weights: missing {len(missing)} tensor(s): {_some(missing)}")
    for k in sorted(out):
        v = out[k]
        if tuple(v.shape) != expected[k] or not v.is_floating_point():
            raise CheckpointError(
                f"HF weights: {_hf_label(k)} is {v.dtype} {list(v.shape)}, config.json asks "
                f"for a float tensor of shape {list(expected[k])}"
            )
    return out


def _hf_label(name: str) -> str:
    """The HF name of a eurotrain weight, for messages."""
    return fused_hf_name(name) or to_hf_name(name)


def _has_hf_name(name: str) -> bool:
    try:
        to_hf_name(name)
    except KeyError:
        return False
    return True


def _from_hf_name_or_none(name: str) -> str | None:
    try:
        return from_hf_name(name)
    except KeyError:
        return None


def _some(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json of the HF model type that computes ``cfg`` (``hf_model_type``)."""
    model_type = hf_model_type(cfg)
    d: dict[str, Any] = {
        "architectures": [CAUSAL_LM[model_type]],
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
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
    }
    window = cfg.sliding_window
    if model_type == "llama":
        d.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    if model_type == "qwen3":
        d["attention_bias"] = cfg.attention_bias
    if model_type == "mistral":
        d["sliding_window"] = window
    if model_type == "qwen3_moe":
        d["attention_bias"] = cfg.attention_bias
    if model_type in MOE_TYPES:
        d.update(moe_hf_config(cfg, model_type))
    if model_type in ("qwen2", "qwen3"):
        # max_window_layers 0: the window (when there is one) applies from the first layer on.
        d.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=0)
    rs = cfg.rope_scaling
    if rs.enabled:
        d["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        }
    return d
