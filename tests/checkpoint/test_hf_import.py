"""`eurotrain convert hf-to-eurotrain` imports exactly what eurotrain can compute, and refuses
the rest with one line naming the field (or tensors) and a non-zero exit code.

Tiny random HF models are built here with transformers (no downloads) and saved with
save_pretrained(safe_serialization=True); settings HF's own classes would not write are patched
into config.json, as a hand-edited or foreign config would hold them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from eurotrain.checkpoint.convert import main as convert
from eurotrain.checkpoint.convert import read_model_weights
from eurotrain.cli import main as cli
from eurotrain.configtools import from_dict
from eurotrain.models import ModelConfig, build_model

transformers = pytest.importorskip("transformers")

SHAPE = dict(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip
TOKENS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))


def save_hf(path: Path, config_cls: str, randomise_biases: bool = False, **kwargs: Any):
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**SHAPE, **kwargs})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if randomise_biases:  # zero biases and norm weights of one would not test the mapping
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
                elif "norm" in name:
                    p.uniform_(0.5, 1.5)
    model.save_pretrained(path, safe_serialization=True)
    return model


def patch_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def run_convert(hf_dir: Path, out: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop what saving the HF model printed
    code = cli(["convert", "hf-to-eurotrain", str(hf_dir), str(out)])
    return code, capsys.readouterr().err


# ---- refused: config.json asks for math eurotrain does not do ------------------------------
REFUSED_BY_HF_CLASS = {
    "llama gelu": (
        "LlamaConfig", {"hidden_act": "gelu_pytorch_tanh"},
        "HF config: hidden_act 'gelu_pytorch_tanh' is not supported: eurotrain's MLP is SwiGLU "
        "(silu); supported model types: llama, qwen2, qwen3, mistral",
    ),
    "qwen2 sliding window on some layers": (
        "Qwen2Config", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
        "HF config: layer_types '2 layers mixing full_attention and sliding_attention' is not "
        "supported: eurotrain applies one sliding window to every layer or none",
    ),
    "gemma": ("GemmaConfig", {"head_dim": 8}, "HF config: model_type 'gemma' is not supported: Gemma's"),
    "qwen2_moe": (
        "Qwen2MoeConfig", {"num_experts": 4, "moe_intermediate_size": 16,
                           "shared_expert_intermediate_size": 32},
        "HF config: model_type 'qwen2_moe' is not supported: Qwen2-MoE adds a shared expert",
    ),
    "olmoe": (
        "OlmoeConfig", {"num_experts": 4},
        "HF config: model_type 'olmoe' is not supported: OLMoE normalises queries and keys",
    ),
    "phi": ("PhiConfig", {}, "HF config: model_type 'phi' is not supported: Phi uses LayerNorm"),
    "llama yarn rope": (
        "LlamaConfig",
        {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                             "original_max_position_embeddings": 32}},
        "HF config: rope_type 'yarn' is not supported: eurotrain implements default RoPE and "
        "Llama-3.1 scaling (llama3)",
    ),
    "llama linear rope": (
        "LlamaConfig", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
        "HF config: rope_type 'linear' is not supported",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED_BY_HF_CLASS))
def test_refuses_hf_models_it_cannot_represent(case, tmp_path, capsys):
    config_cls, kwargs, message = REFUSED_BY_HF_CLASS[case]
    save_hf(tmp_path / "hf", config_cls, **kwargs)
    code, err = run_convert(tmp_path / "hf", tmp_path / "out", capsys)
    assert code == 2, err
    assert message in err
    assert err.count("\n") == 1, err  # one line
    assert not (tmp_path / "out").exists()  # refused before anything is written


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 500000.0}  # fmt: skip

REFUSED_BY_PATCH = {
    "sequence classification": (
        {"architectures": ["LlamaForSequenceClassification"]},
        'HF config: architectures ["LlamaForSequenceClassification"] is not supported',
    ),
    "partial rotary": (
        {"partial_rotary_factor": 0.5},
        "HF config: partial_rotary_factor 0.5 is not supported",
    ),
    "softcapping": (
        {"attn_logit_softcapping": 50.0},
        "HF config: attn_logit_softcapping 50.0 is not supported: eurotrain does not implement",
    ),
    "qk norm": ({"qk_norm": True}, "HF config: qk_norm true is not supported"),
    "quantized": (
        {"quantization_config": {"quant_method": "gptq", "bits": 4}},
        "HF config: quantization_config 'gptq' is not supported",
    ),
    "remote code": ({"auto_map": {"AutoModelForCausalLM": "m.M"}}, "HF config: auto_map"),
    "missing model_type": ({"model_type": None}, "HF config: model_type null is missing"),
    "bad type": ({"hidden_size": "32"}, "HF config: hidden_size '32' is not a positive integer"),
    "missing size": ({"vocab_size": None}, "HF config: vocab_size is missing"),
    "layer types": (
        {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True,
         "layer_types": ["full_attention", "chunked_attention"]},
        'HF config: layer_types ["full_attention", "chunked_attention"] is not supported',
    ),
    # json reads Infinity (and 1e400) as inf, which `value > 0` lets through.
    "infinite rms_norm_eps": (
        {"rms_norm_eps": float("inf")},
        "HF config: rms_norm_eps Infinity is not a finite positive number",
    ),
    "infinite rope_theta": (
        {"rope_parameters": {"rope_type": "default", "rope_theta": float("inf")}},
        "HF config: rope_theta Infinity is not a finite positive number",
    ),
    "infinite llama3 factor": (
        {"rope_parameters": {**LLAMA3, "factor": float("inf")}},
        "HF config: rope_scaling (llama3) factor Infinity is not a finite positive number",
    ),
    "llama3 low_freq_factor 0": (
        {"rope_parameters": {**LLAMA3, "low_freq_factor": 0}},
        "HF config: rope_scaling (llama3) low_freq_factor 0 is not a finite positive number",
    ),
    "llama3 high_freq_factor < 0": (
        {"rope_parameters": {**LLAMA3, "high_freq_factor": -4.0}},
        "HF config: rope_scaling (llama3) high_freq_factor -4.0 is not a finite positive number",
    ),
    "llama3 fractional original context": (
        {"rope_parameters": {**LLAMA3, "original_max_position_embeddings": 16.5}},
        "HF config: rope_scaling (llama3) original_max_position_embeddings 16.5 is not a whole "
        "number",
    ),
    "infinite aux loss": (
        {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
         "router_aux_loss_coef": float("inf")},
        "HF config: router_aux_loss_coef Infinity is not a finite number >= 0",
    ),
    "context past fp32 positions": (
        {"max_position_embeddings": 10**13},
        "HF config: max_position_embeddings 10000000000000 is more than the 16777216 positions "
        "eurotrain's fp32 RoPE tables count exactly; set it in config.json to the context you "
        "will train with",
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama") / "hf"
    save_hf(path, "LlamaConfig")
    return path


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("case", list(REFUSED_BY_PATCH))
def test_refuses_configs_with_foreign_settings(case, llama_dir, tmp_path, capsys):
    changes, message = REFUSED_BY_PATCH[case]
    hf_dir = copy_dir(llama_dir, tmp_path / "hf")
    patch_config(hf_dir, **changes)
    code, err = run_convert(hf_dir, tmp_path / "out", capsys)
    assert code == 2, err
    assert message in err
    assert err.count("\n") == 1, err


# ---- refused: the tensors are not those of the model config.json describes -----------------
def test_extra_tensors_are_named(tmp_path, capsys):
    """A Llama with o_proj/q_proj biases whose config.json claims none: the biases would be
    written and then ignored; the import names them instead."""
    save_hf(tmp_path / "hf", "LlamaConfig", attention_bias=True)
    patch_config(tmp_path / "hf", attention_bias=False)
    code, err = run_convert(tmp_path / "hf", tmp_path / "out", capsys)
    assert code == 1, err
    assert "HF weights: 8 tensor(s) a 'llama' eurotrain model has no place for: " in err
    assert "model.layers.0.self_attn.k_proj.bias" in err and "and 2 more" in err
    assert err.count("\n") == 1, err


def test_missing_and_misshapen_tensors_are_named(llama_dir, tmp_path, capsys):
    hf_dir = copy_dir(llama_dir, tmp_path / "hf")
    state = load_file(hf_dir / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    code, err = run_convert(hf_dir, tmp_path / "out", capsys)
    assert code == 1 and "HF weights: missing 1 tensor(s): model.layers.1.mlp.up_proj.weight" in err

    hf_dir = copy_dir(llama_dir, tmp_path / "hf2")
    patch_config(hf_dir, intermediate_size=48)
    code, err = run_convert(hf_dir, tmp_path / "out2", capsys)
    assert code == 1
    assert (
        "HF weights: model.layers.0.mlp.gate_proj.weight is torch.float32 [64, 32], config.json "
        "asks for a float tensor of shape [48, 32]"
    ) in err


def test_tied_model_with_a_different_lm_head_is_refused(tmp_path, capsys):
    save_hf(tmp_path / "hf", "LlamaConfig", tie_word_embeddings=True)
    state = load_file(tmp_path / "hf" / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 1
    save_file(state, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    code, err = run_convert(tmp_path / "hf", tmp_path / "out", capsys)
    assert code == 1
    assert "tie_word_embeddings is true but lm_head.weight differs" in err


def test_index_naming_a_file_outside_the_directory_is_refused(llama_dir, tmp_path, capsys):
    hf_dir = copy_dir(llama_dir, tmp_path / "hf")
    index = {"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    code, err = run_convert(hf_dir, tmp_path / "out", capsys)
    assert code == 1 and "names files outside" in err


# ---- accepted: imported, and the same function as HF's -------------------------------------
ACCEPTED = {
    "llama": ("LlamaConfig", {}),
    "llama tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "llama3.1 rope": (
        "LlamaConfig",
        {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                             "rope_theta": 500000.0}},
    ),
    "llama head_dim": ("LlamaConfig", {"head_dim": 16}),
    "qwen2": ("Qwen2Config", {}),
    "qwen2 window on no layer": (
        "Qwen2Config", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2}
    ),
    "mistral no window": ("MistralConfig", {"sliding_window": None}),
    "mistral window >= context": ("MistralConfig", {"sliding_window": 64}),
    "mistral sliding window": ("MistralConfig", {"sliding_window": 8}),
    "qwen2 sliding window": (
        "Qwen2Config", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}
    ),
    "llama attention and mlp bias": ("LlamaConfig", {"attention_bias": True, "mlp_bias": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "qwen3 bias and window": (
        "Qwen3Config",
        {"head_dim": 8, "attention_bias": True, "use_sliding_window": True, "sliding_window": 8,
         "max_window_layers": 0},
    ),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe sparse step": (
        "Qwen3MoeConfig",
        {"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 3, "moe_intermediate_size": 16,
         "decoder_sparse_step": 2, "use_sliding_window": True, "sliding_window": 8},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_supported_models_import_to_the_same_logits(case, tmp_path, capsys):
    config_cls, kwargs = ACCEPTED[case]
    hf = save_hf(tmp_path / "hf", config_cls, randomise_biases=True, **kwargs)
    code, err = run_convert(tmp_path / "hf", tmp_path / "et", capsys)
    assert code == 0, err
    step = tmp_path / "et" / "step-000000"
    cfg = from_dict(ModelConfig, yaml.safe_load((step / "config.yaml").read_text())["model"])
    ours = build_model(cfg, "cpu")
    ours.load_state_dict(read_model_weights(step), strict=True)
    with torch.no_grad():
        want = hf(TOKENS).logits
        got = ours.eval()(TOKENS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_longest_context_imports(llama_dir, tmp_path, capsys):
    """2**24 positions, the most fp32 counts exactly, import (the tables are built later)."""
    hf_dir = copy_dir(llama_dir, tmp_path / "hf")
    patch_config(hf_dir, max_position_embeddings=2**24)
    code, err = run_convert(hf_dir, tmp_path / "out", capsys)
    assert code == 0, err
    assert (
        yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["model"]["max_seq_len"]
        == 2**24
    )


def test_attention_dropout_is_imported_with_a_note(llama_dir, tmp_path, capsys):
    hf_dir = copy_dir(llama_dir, tmp_path / "hf")
    patch_config(hf_dir, attention_dropout=0.1)
    code, err = run_convert(hf_dir, tmp_path / "out", capsys)
    assert code == 0
    assert "note: attention_dropout 0.1 is not applied: eurotrain trains without dropout" in err


ROUND_TRIPS = {
    "qwen2": ("Qwen2Config", {}, "Qwen2ForCausalLM"),
    # A Mistral without a window is Llama's function: it comes back in Llama's classes.
    "mistral no window": ("MistralConfig", {"sliding_window": None}, "LlamaForCausalLM"),
    "mistral sliding window": ("MistralConfig", {"sliding_window": 8}, "MistralForCausalLM"),
    "qwen3": ("Qwen3Config", {"head_dim": 8, "attention_bias": True}, "Qwen3ForCausalLM"),
    "llama biases": ("LlamaConfig", {"attention_bias": True, "mlp_bias": True}, "LlamaForCausalLM"),
    # Per-expert names (what save_pretrained writes) in, the same out.
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "sliding_window": 8}, "MixtralForCausalLM"),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
         "norm_topk_prob": True, "mlp_only_layers": [0], "attention_bias": True},
        "Qwen3MoeForCausalLM",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_export_round_trip_keeps_the_architecture_and_logits(case, tmp_path, capsys):
    """HF -> eurotrain -> HF: the same model type (Qwen2's q/k/v biases, Mistral's window,
    Qwen3's q/k norms, Llama's biases) and the same logits."""
    config_cls, kwargs, expected = ROUND_TRIPS[case]
    hf = save_hf(tmp_path / "hf", config_cls, randomise_biases=True, **kwargs)
    assert run_convert(tmp_path / "hf", tmp_path / "et", capsys)[0] == 0
    assert convert(["eurotrain-to-hf", str(tmp_path / "et"), str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back).__name__ == expected
    with torch.no_grad():
        torch.testing.assert_close(back(TOKENS).logits, hf(TOKENS).logits, rtol=1e-5, atol=1e-5)
