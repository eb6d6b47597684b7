"""Reading a HF transformers config.json: which models eurotrain can represent, and refusing the rest.

eurotrain's decoder is HF's LlamaForCausalLM math (RMSNorm, rotate-half RoPE with optional
Llama-3.1 scaling, grouped-query causal attention, SwiGLU) with Llama's optional attention and
MLP biases, Qwen2's q/k/v biases, Qwen3's per-head q/k norms, Mistral's sliding window (in every
layer), and Mixtral's and Qwen3-MoE's mixture-of-experts blocks (a softmax top-k router over
SwiGLU experts). A config that asks for anything else would import to a *different* model without
a word (Gemma's (1 + w) norm, a window on some layers only, GELU, YaRN RoPE, gated shared
experts...), so every field HF's code for these types reads is checked here, and each refusal is
one line naming the field, its value and what is supported. The config is treated as untrusted
input: wrong types are errors, not tracebacks.
"""

from __future__ import annotations

import json
import math
from typing import Any

from eurotrain.errors import ConfigError, clip
from eurotrain.models.config import MAX_POSITIONS, ModelConfig, MoEConfig, RopeScaling

CAUSAL_LM = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
SUPPORTED = "supported model types: llama, qwen2, qwen3, mistral, mixtral, qwen3_moe"
MOE_TYPES = ("mixtral", "qwen3_moe")

# Why the common relatives differ; any other model_type gets the general reason.
_OTHER_TYPES = {
    "gemma": "Gemma's RMSNorm scales by (1 + weight) and it multiplies embeddings by sqrt(dim)",
    "gemma2": "Gemma 2 adds (1 + weight) norms after each sublayer and logit soft-capping",
    "gemma3": "Gemma 3 adds (1 + weight) norms, q/k norms and local attention layers",
    "qwen2_moe": "Qwen2-MoE adds a shared expert behind a sigmoid gate, which eurotrain's shared "
    "experts do not have",
    "deepseek_v2": "DeepSeek-V2 uses multi-head latent attention and experts",
    "deepseek_v3": "DeepSeek-V3 uses multi-head latent attention and experts",
    "olmoe": "OLMoE normalises queries and keys over all heads together",
    "gpt_oss": "gpt-oss has attention sinks, biased experts and a clamped SwiGLU",
    "qwen3_next": "Qwen3-Next mixes linear (gated delta-net) attention layers and gated experts",
    "jamba": "Jamba interleaves Mamba layers",
    "phi": "Phi uses LayerNorm, a GELU MLP, biases and partial rotary embeddings",
    "phi3": "Phi-3 fuses q/k/v and gate/up projections and may use LongRoPE",
    "olmo2": "OLMo 2 normalises after each sublayer and normalises queries and keys",
}

# HF's defaults for keys a config.json may leave out (the class defaults of transformers 4/5).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048},
    "qwen2": {"max_position_embeddings": 32768, "num_key_value_heads": 32},
    "qwen3": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "head_dim": 128},
    "mistral": {
        "max_position_embeddings": 131072,
        "num_key_value_heads": 8,
        "sliding_window": 4096,
    },
    "mixtral": {
        "max_position_embeddings": 131072,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.001,
    },
    "qwen3_moe": {
        "max_position_embeddings": 32768,
        "num_key_value_heads": 4,
        "intermediate_size": 6144,
        "sliding_window": 4096,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "router_aux_loss_coef": 0.001,
    },
}

# Settings that none of HF's Llama, Qwen2 or Mistral code applies; a config that sets them was
# written for other modelling code (or trust_remote_code), which eurotrain cannot reproduce.
_FOREIGN = {
    "attn_logit_softcapping": "attention logit soft-capping",
    "final_logit_softcapping": "final logit soft-capping",
    "qk_norm": "query/key normalisation",
    "use_qk_norm": "query/key normalisation",
    "qk_layernorm": "query/key normalisation",
    "use_bidirectional_attention": "bidirectional attention",
    "quantization_config": "quantized weights (import the unquantized float model)",
    "auto_map": "custom modelling code (trust_remote_code); remove auto_map from config.json "
    "only if the model is plain Llama/Qwen2/Mistral",
}


def _refuse(field: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"HF config: {field} {_show(value)} is not supported: {why}; {SUPPORTED}")


def _show(value: Any) -> str:
    """Strings quoted as in Python, everything else as config.json writes it (true, null), cut
    to a line (config.json is read with a size cap and 64-bit integers only, so building
    the text first is bounded)."""
    return clip(repr(value) if isinstance(value, str) else json.dumps(value, default=str))


def _count(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        shown = "is missing" if value is None else f"{_show(value)} is not a positive integer"
        raise ConfigError(f"HF config: {field} {shown}")
    return value


def _positive(value: Any, field: str) -> float:
    if not _number(value) or not value > 0:
        raise ConfigError(f"HF config: {field} {_show(value)} is not a finite positive number")
    return float(value)


def _number(value: Any) -> bool:
    """A finite int or float: json reads 1e400 and Infinity as inf, which `value > 0` lets
    through into the model (an infinite norm epsilon or RoPE base), and NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past float's range
        return False


def _flag(d: dict[str, Any], key: str) -> bool:
    value = d.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"HF config: {key} {_show(value)} is not true or false")
    return value


def check_model_type(d: dict[str, Any]) -> str:
    model_type = d.get("model_type")
    if not isinstance(model_type, str):
        raise ConfigError(
            f"HF config: model_type {_show(model_type)} is missing or not a string; {SUPPORTED}"
        )
    if model_type not in CAUSAL_LM:
        why = _OTHER_TYPES.get(model_type, "eurotrain's decoder is the Llama architecture")
        raise _refuse("model_type", model_type, why)
    archs = d.get("architectures")
    if archs is not None and archs != [CAUSAL_LM[model_type]]:
        raise _refuse(
            "architectures",
            archs,
            f"eurotrain imports the causal LM ({CAUSAL_LM[model_type]} for model_type "
            f"{model_type}), not heads for other tasks",
        )
    return model_type


def _check_math(d: dict[str, Any], model_type: str) -> None:
    """Fields of the supported types that would change the computed function."""
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise _refuse("hidden_act", act, "eurotrain's MLP is SwiGLU (silu)")
    for key, what in _FOREIGN.items():
        value = d.get(key)
        if value not in (None, False):
            if key == "quantization_config" and isinstance(value, dict):
                value = value.get("quant_method", "?")
            elif key == "auto_map" and isinstance(value, dict):
                value = sorted(value)
            raise _refuse(key, value, f"eurotrain does not implement {what}")


def _sliding_window(d: dict[str, Any], model_type: str) -> int | None:
    """The window eurotrain applies in every layer, or None. A window at least as long as the
    context never masks anything (None); a window on some layers only is refused."""
    context = _context(d, model_type)
    if model_type == "llama":
        return None  # HF's Llama has no sliding window
    window = d.get("sliding_window", _DEFAULTS[model_type].get("sliding_window"))
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and not _flag(d, "use_sliding_window"):
        return None  # HF's Qwen configs drop the window when use_sliding_window is false
    # Qwen3-MoE's modelling code applies the window to every layer (it reads no layer types).
    if model_type in ("qwen2", "qwen3"):
        num_layers = _count(d.get("num_hidden_layers"), "num_hidden_layers")
        layers = d.get("layer_types")
        if layers is None:  # HF's rule: layers from max_window_layers on slide
            start = d.get("max_window_layers", 28)
            if isinstance(start, bool) or not isinstance(start, int):
                raise ConfigError(f"HF config: max_window_layers {_show(start)} is not an integer")
            layers = [
                "sliding_attention" if i >= start else "full_attention" for i in range(num_layers)
            ]
        elif not isinstance(layers, list) or any(
            t not in ("full_attention", "sliding_attention") for t in layers
        ):
            raise _refuse("layer_types", layers, "eurotrain's layers are causal attention")
        elif len(layers) != num_layers:
            raise ConfigError(
                f"HF config: layer_types names {len(layers)} layers, num_hidden_layers is "
                f"{num_layers}"
            )
        if "sliding_attention" not in layers:
            return None
        if "full_attention" in layers and isinstance(window, int) and window < context:
            raise _refuse(
                "layer_types",
                _summary(layers),
                "eurotrain applies one sliding window to every layer or none, not to some",
            )
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(
            f"HF config: sliding_window {_show(window)} is not a positive integer or null"
        )
    return window if window < context else None


def _summary(layers: list[str]) -> str:
    kinds = sorted(set(layers))
    return f"{len(layers)} layers mixing {' and '.join(kinds)}"


def _context(d: dict[str, Any], model_type: str) -> int:
    default = _DEFAULTS[model_type]["max_position_embeddings"]
    context = _count(d.get("max_position_embeddings", default), "max_position_embeddings")
    if context > MAX_POSITIONS:
        raise ConfigError(
            f"HF config: max_position_embeddings {context} is more than the {MAX_POSITIONS} "
            f"positions eurotrain's fp32 RoPE tables count exactly; set it in config.json to "
            f"the context you will train with"
        )
    return context


def _rope(d: dict[str, Any], default_theta: float = 10000.0) -> tuple[float, RopeScaling]:
    """(theta, scaling) from v4's rope_theta / rope_scaling or v5's rope_parameters."""
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"HF config: rope_parameters {_show(params)} is not a mapping")
    if params and all(isinstance(v, dict) for v in params.values()):  # one per layer type
        distinct = [v for i, v in enumerate(params.values()) if v not in list(params.values())[:i]]
        if len(distinct) > 1:
            raise _refuse("rope_parameters", params, "eurotrain uses one RoPE for all layers")
        params = distinct[0]
    theta = _positive(params.get("rope_theta", d.get("rope_theta", default_theta)), "rope_theta")
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor"))
    if partial is not None and partial != 1.0:
        raise _refuse(
            "partial_rotary_factor", partial, "eurotrain rotates the whole head dimension"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, RopeScaling()
    if rope_type != "llama3":
        raise _refuse(
            "rope_type",
            rope_type,
            "eurotrain implements default RoPE and Llama-3.1 scaling (llama3)",
        )
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    values = [_positive(params.get(key), f"rope_scaling (llama3) {key}") for key in keys]
    if not values[3].is_integer():  # HF divides by it as given; int() would change the model
        raise ConfigError(
            f"HF config: rope_scaling (llama3) original_max_position_embeddings "
            f"{_show(params['original_max_position_embeddings'])} is not a whole number"
        )
    try:
        return theta, RopeScaling(
            factor=values[0],
            low_freq_factor=values[1],
            high_freq_factor=values[2],
            original_max_position_embeddings=int(values[3]),
        )
    except ConfigError as e:
        raise ConfigError(f"HF config: rope_scaling (llama3): {e}") from None


def _non_negative(d: dict[str, Any], key: str, default: float) -> float:
    value = d.get(key, default)
    if not _number(value) or not value >= 0:
        raise ConfigError(f"HF config: {key} {_show(value)} is not a finite number >= 0")
    return float(value)


def _num_experts(d: dict[str, Any], model_type: str) -> int:
    """HF maps num_experts onto num_local_experts (attribute_map); config.json holds either."""
    given = {k: d[k] for k in ("num_experts", "num_local_experts") if d.get(k) is not None}
    if len(set(map(_show, given.values()))) > 1:
        raise ConfigError(
            f"HF config: num_experts {_show(given['num_experts'])} and num_local_experts "
            f"{_show(given['num_local_experts'])} disagree; HF reads them as one setting"
        )
    value = next(iter(given.values()), _DEFAULTS[model_type]["num_experts"])
    if model_type == "qwen3_moe" and value == 0:
        return 0  # HF's Qwen3-MoE then makes every block a dense MLP
    return _count(value, next(iter(given), "num_experts"))


def moe_from_hf(d: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The experts of a Mixtral or Qwen3-MoE config: both route by a softmax over the experts
    (fp32), keep the top k scores (Mixtral always renormalises them, Qwen3-MoE when
    norm_topk_prob) and run SwiGLU experts; neither has shared experts or a routing scale.
    router_aux_loss_coef becomes aux_loss_coef (docs/checkpointing.md: the normalisation).
    Returns MoEConfig's fields ({} for none), checked as a whole by the caller."""
    defaults = _DEFAULTS[model_type]
    num_experts = _num_experts(d, model_type)
    if num_experts == 0:
        return {}
    top_k = _count(
        d.get("num_experts_per_tok", defaults["num_experts_per_tok"]), "num_experts_per_tok"
    )
    aux = _non_negative(d, "router_aux_loss_coef", defaults["router_aux_loss_coef"])
    _flag(d, "output_router_logits")  # only whether HF returns (and trains on) the aux loss
    if model_type == "mixtral":
        _non_negative(d, "router_jitter_noise", 0.0)  # training-only noise: hf_config_notes
        expert_dim = _count(d.get("intermediate_size"), "intermediate_size")
        return dict(
            num_experts=num_experts, top_k=top_k, expert_ffn_dim=expert_dim, aux_loss_coef=aux
        )
    norm = _flag(d, "norm_topk_prob")
    dense = d.get("mlp_only_layers")
    dense = [] if dense is None else dense
    if not isinstance(dense, list) or any(
        isinstance(i, bool) or not isinstance(i, int) for i in dense
    ):
        raise ConfigError(
            f"HF config: mlp_only_layers {_show(dense)} is not a list of layer indices"
        )
    every = _count(d.get("decoder_sparse_step", 1), "decoder_sparse_step")
    moe_dim = d.get("moe_intermediate_size", defaults["moe_intermediate_size"])
    return dict(
        num_experts=num_experts,
        top_k=top_k,
        expert_ffn_dim=_count(moe_dim, "moe_intermediate_size"),
        norm_topk_prob=norm,
        aux_loss_coef=aux,
        dense_layers=sorted(set(dense)),
        every=every,
    )


def from_hf_config(d: Any) -> ModelConfig:
    """ModelConfig from a HF config.json dict of a Llama, Qwen2, Qwen3, Mistral, Mixtral or
    Qwen3-MoE causal LM; a ConfigError naming the field for anything eurotrain would compute
    differently."""
    if not isinstance(d, dict):
        raise ConfigError(f"HF config: expected a JSON object, got {type(d).__name__}")
    model_type = check_model_type(d)
    _check_math(d, model_type)
    defaults = _DEFAULTS[model_type]
    theta, scaling = _rope(d, defaults.get("rope_theta", 10000.0))
    kv_heads = d.get("num_key_value_heads", defaults.get("num_key_value_heads"))
    head_dim = d.get("head_dim", defaults.get("head_dim"))
    name = d.get("_name_or_path")
    num_layers = _count(d.get("num_hidden_layers"), "num_hidden_layers")
    # Llama reads attention_bias and mlp_bias; Qwen3 and Qwen3-MoE attention_bias (all four
    # projections); Qwen2 always has q/k/v biases; Mistral and Mixtral have none.
    biased = model_type in ("llama", "qwen3", "qwen3_moe")
    moe = moe_from_hf(d, model_type) if model_type in MOE_TYPES else {}
    ffn = d.get("intermediate_size", defaults.get("intermediate_size"))
    fields: dict[str, Any] = dict(  # read first: a bad field is named alone, not wrapped
        name=name if isinstance(name, str) and name else model_type,
        vocab_size=_count(d.get("vocab_size"), "vocab_size"),
        dim=_count(d.get("hidden_size"), "hidden_size"),
        num_layers=num_layers,
        num_heads=_count(d.get("num_attention_heads"), "num_attention_heads"),
        num_kv_heads=None if kv_heads is None else _count(kv_heads, "num_key_value_heads"),
        head_dim=None if head_dim is None else _count(head_dim, "head_dim"),
        ffn_dim=_count(ffn, "intermediate_size"),
        norm_eps=_positive(
            d.get("rms_norm_eps", defaults.get("rms_norm_eps", 1e-6)), "rms_norm_eps"
        ),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=_context(d, model_type),
        tie_embeddings=_flag(d, "tie_word_embeddings"),
        qkv_bias=model_type == "qwen2",
        attention_bias=biased and _flag(d, "attention_bias"),
        mlp_bias=model_type == "llama" and _flag(d, "mlp_bias"),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        sliding_window=_sliding_window(d, model_type),
    )
    try:
        return ModelConfig(**fields, moe=MoEConfig(**moe))
    except ConfigError as e:
        raise ConfigError(f"HF config: does not make a valid eurotrain model: {e}") from None


def hf_config_notes(d: dict[str, Any]) -> list[str]:
    """Settings that do not change the weights' function but that eurotrain does not apply."""
    notes = []
    dropout = d.get("attention_dropout", 0.0)
    if isinstance(dropout, (int, float)) and dropout > 0:
        notes.append(
            f"attention_dropout {dropout} is not applied: eurotrain trains without dropout"
        )
    jitter = d.get("router_jitter_noise", 0.0) if d.get("model_type") == "mixtral" else 0.0
    if isinstance(jitter, (int, float)) and jitter > 0:
        notes.append(
            f"router_jitter_noise {jitter} is not applied: like dropout it only perturbed HF's "
            f"training (the router's inputs); eurotrain trains without it"
        )
    tp = d.get("pretraining_tp", 1)
    if isinstance(tp, int) and tp > 1:
        notes.append(
            f"pretraining_tp {tp} only split HF's matmuls into slices (the same function up to "
            f"rounding); eurotrain computes them whole"
        )
    return notes
