"""from_hf_config on config.json dicts as transformers 4 and 5 write them, with HF's defaults for
keys left out, and one-line refusals for anything eurotrain would compute differently."""

from __future__ import annotations

import pytest

from eurotrain.errors import ConfigError
from eurotrain.models import RopeScaling
from eurotrain.models.hf import from_hf_config

# A transformers-4 Llama 3.2 1B config.json (rope_theta and rope_scaling at the top level).
LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
    "attention_dropout": 0.0, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 128256,
}  # fmt: skip
SMALL = {
    "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 8,
}  # fmt: skip


def test_transformers_4_llama_3_2_config():
    cfg = from_hf_config(LLAMA_32_1B)
    assert (cfg.dim, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) == (2048, 16, 8, 64)
    assert cfg.rope_theta == 500000.0 and cfg.tie_embeddings and not cfg.qkv_bias
    assert cfg.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    assert cfg.num_params() == 1_235_814_400  # Llama 3.2 1B's published count


def test_missing_keys_take_hf_defaults():
    """Mistral's class defaults are 8 KV heads, a 4096 window and a 131072 context."""
    assert from_hf_config({"model_type": "mistral", **SMALL}).sliding_window == 4096
    cfg = from_hf_config({"model_type": "mistral", "sliding_window": None, **SMALL})
    assert (cfg.num_kv_heads, cfg.max_seq_len, cfg.norm_eps) == (8, 131072, 1e-6)
    assert cfg.sliding_window is None
    qwen3 = from_hf_config({"model_type": "qwen3", **SMALL, "num_attention_heads": 32})
    assert qwen3.qk_norm and (qwen3.head_dim, qwen3.num_kv_heads) == (128, 32)
    assert not qwen3.qkv_bias and not qwen3.attention_bias and qwen3.sliding_window is None
    qwen = {**SMALL, "hidden_size": 64, "num_attention_heads": 32}
    cfg = from_hf_config({"model_type": "qwen2", "sliding_window": 16, **qwen})
    assert cfg.qkv_bias and (cfg.num_kv_heads, cfg.max_seq_len) == (32, 32768)


def test_rope_parameters_per_layer_type_must_agree():
    same = {"rope_type": "default", "rope_theta": 1e6}
    nested = {"full_attention": same, "sliding_attention": dict(same)}
    assert (
        from_hf_config({"model_type": "llama", "rope_parameters": nested, **SMALL}).rope_theta
        == 1e6
    )
    nested["sliding_attention"] = {"rope_type": "default", "rope_theta": 1e4}
    with pytest.raises(ConfigError, match="eurotrain uses one RoPE for all layers"):
        from_hf_config({"model_type": "llama", "rope_parameters": nested, **SMALL})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"partial_rotary_factor": None}, None),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor null is not a finite positive number"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
        ({"num_attention_heads": 6}, "does not make a valid eurotrain model: model.num_kv_heads"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings 'yes' is not true or false"),
        ({"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": "x"},
         "max_window_layers 'x' is not an integer"),
        ({"model_type": "gemma2"}, "model_type 'gemma2' is not supported: Gemma 2"),
        ({"model_type": "falcon"}, "model_type 'falcon' is not supported: eurotrain's decoder"),
    ],
)  # fmt: skip
def test_fields(changes, message):
    d = {"model_type": "llama", **SMALL, "num_key_value_heads": 4, **changes}
    if message is None:
        from_hf_config(d)
        return
    with pytest.raises(ConfigError, match=r"^HF config: ") as err:
        from_hf_config(d)
    assert message in str(err.value) and "\n" not in str(err.value)


BASE = {**SMALL, "num_key_value_heads": 4}


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"model_type": "mistral", "sliding_window": 16}, dict(sliding_window=16)),
        ({"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 16,
          "max_window_layers": 0}, dict(sliding_window=16, qk_norm=True)),
        ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16,
          "layer_types": ["sliding_attention"] * 2}, dict(sliding_window=16, qkv_bias=True)),
        ({"model_type": "llama", "attention_bias": True, "mlp_bias": True},
         dict(attention_bias=True, mlp_bias=True, qkv_bias=False)),
        ({"model_type": "mistral", "attention_bias": True}, dict(attention_bias=False)),
    ],
)  # fmt: skip
def test_accepted_variants(changes, expected):
    cfg = from_hf_config({**BASE, **changes})
    for key, value in expected.items():
        assert getattr(cfg, key) == value, key


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "qwen2_moe"}, "model_type 'qwen2_moe' is not supported: Qwen2-MoE adds "
         "a shared expert behind a sigmoid gate"),
        ({"model_type": "deepseek_v3"}, "multi-head latent attention"),
        ({"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 16,
          "max_window_layers": 1}, "layer_types '2 layers mixing full_attention and sliding_"),
        ({"model_type": "mistral", "sliding_window": 0}, "sliding_window 0 is not a positive"),
        ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16,
          "layer_types": ["sliding_attention"] * 3}, "layer_types names 3 layers, num_hidden_"),
    ],
)  # fmt: skip
def test_refused_variants(changes, message):
    with pytest.raises(ConfigError, match=r"^HF config: ") as err:
        from_hf_config({**BASE, **changes})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_not_an_object():
    with pytest.raises(ConfigError, match="expected a JSON object, got list"):
        from_hf_config([1, 2])
