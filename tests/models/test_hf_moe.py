"""Mixture-of-experts models against HF transformers' Mixtral and Qwen3-MoE: exported weights
load with from_pretrained and give the same logits and greedy generations; HF's weights (fused
transformers-5 names and the legacy per-expert names of hub checkpoints) import to the same
model; configs either side cannot represent are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from eurotrain.errors import CheckpointError, ConfigError
from eurotrain.models import ModelConfig, build_model
from eurotrain.models.config import MoEConfig
from eurotrain.models.hf import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict
from eurotrain.models.hf_config import hf_config_notes

transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=96, dim=32, num_heads=4, num_kv_heads=2, ffn_dim=48, max_seq_len=64)
VARIANTS = {
    # Every block MoE, always renormalised top-2, a sliding window: Mixtral.
    "mixtral-window": (
        ModelConfig(**SHAPE, num_layers=2, sliding_window=12,
                    moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=24, aux_loss_coef=0.02)),
        "MixtralForCausalLM",
    ),
    # q/k norms, a dense first block (mlp_only_layers), renormalised top-2: Qwen3-MoE.
    "qwen3-moe-dense-first": (
        ModelConfig(**SHAPE, num_layers=3, qk_norm=True, head_dim=16,
                    moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=16, dense_layers=[0])),
        "Qwen3MoeForCausalLM",
    ),
    # Every second block MoE (decoder_sparse_step 2), raw top-3 scores, attention biases, window.
    "qwen3-moe-sparse-step": (
        ModelConfig(**SHAPE, num_layers=4, qk_norm=True, attention_bias=True, sliding_window=10,
                    moe=MoEConfig(num_experts=6, top_k=3, expert_ffn_dim=16, every=2,
                                  norm_topk_prob=False)),
        "Qwen3MoeForCausalLM",
    ),
    # top-1 with norm_topk_prob: the one expert weighs 1, as in HF.
    "qwen3-moe-top1": (
        ModelConfig(**SHAPE, num_layers=2, qk_norm=True, tie_embeddings=True,
                    moe=MoEConfig(num_experts=4, top_k=1, expert_ffn_dim=16)),
        "Qwen3MoeForCausalLM",
    ),
}  # fmt: skip
TOKENS = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))


def ours_random(cfg: ModelConfig, seed: int = 5):
    model = build_model(cfg, "cpu")
    model.init_weights(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1, generator=gen)
            elif "norm" in name:
                p.uniform_(0.5, 1.5, generator=gen)
            elif "router" in name:  # clear choices: no near-ties that rounding could flip
                p.normal_(0, 1.0, generator=gen)
    return model.eval()


def export(model, cfg: ModelConfig, path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    state = {k: v.contiguous() for k, v in to_hf_state_dict(model.state_dict(), cfg).items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """variant -> (ours, HF model loaded by from_pretrained from our export, its directory)."""
    out = {}
    for name, (cfg, _) in VARIANTS.items():
        ours = ours_random(cfg)
        hf_dir = export(ours, cfg, tmp_path_factory.mktemp(name) / "hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        out[name] = (ours, hf.eval(), hf_dir)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_loads_in_transformers_with_the_same_logits(variant, twins):
    ours, hf, _ = twins[variant]
    assert type(hf).__name__ == VARIANTS[variant][1]
    with torch.no_grad():
        diff = (ours(TOKENS) - hf(TOKENS).logits).abs().max().item()
    assert diff <= 1e-5, f"{variant}: max abs logit difference {diff}"


@pytest.mark.parametrize("variant", ["mixtral-window", "qwen3-moe-sparse-step"])
def test_greedy_generation_matches_transformers(variant, twins):
    """24 greedy tokens after a 6-token prompt, past the window, through HF's KV cache."""
    ours, hf, _ = twins[variant]
    prompt = TOKENS[:, :6]
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False)
        got = prompt
        for _ in range(24):
            got = torch.cat([got, ours(got)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, want), f"{variant}: first difference at {(got != want).nonzero()[:1]}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_weights_and_config_import_back(variant, twins):
    """HF's in-memory state dict (fused gate_up_proj / down_proj) and its config.json."""
    ours, hf, _ = twins[variant]
    cfg = from_hf_config(hf.config.to_dict())
    assert cfg.num_params() == VARIANTS[variant][0].num_params()
    want = VARIANTS[variant][0]
    for key in ("qk_norm", "attention_bias", "sliding_window", "tie_embeddings", "head_dim"):
        assert getattr(cfg, key) == getattr(want, key), key
    for key in ("num_experts", "top_k", "expert_ffn_dim", "dense_layers", "every"):
        assert getattr(cfg.moe, key) == getattr(want.moe, key), key
    state = from_hf_state_dict(hf.state_dict(), cfg)
    for name, p in ours.state_dict().items():
        assert torch.equal(state[name], p), name


def test_legacy_per_expert_names_import(twins):
    """Hub checkpoints name each expert (Mixtral block_sparse_moe.experts.{j}.w1, Qwen3-MoE
    mlp.experts.{j}.gate_proj); that is also what save_pretrained writes."""
    from safetensors.torch import load_file

    for variant in ("mixtral-window", "qwen3-moe-dense-first"):
        ours, _, hf_dir = twins[variant]
        saved = load_file(hf_dir / "model.safetensors")
        legacy = "block_sparse_moe.experts.3.w1.weight" if "mixtral" in variant else (
            "mlp.experts.3.gate_proj.weight")  # fmt: skip
        assert any(k.endswith(legacy) for k in saved), sorted(saved)[:8]
        cfg = from_hf_config(json.loads((hf_dir / "config.json").read_text()))
        state = from_hf_state_dict(saved, cfg)
        for name, p in ours.state_dict().items():
            assert torch.equal(state[name], p), name


def test_mixed_and_incomplete_expert_tensors_are_named(twins):
    ours, hf, _ = twins["qwen3-moe-dense-first"]
    cfg = from_hf_config(hf.config.to_dict())
    fused = hf.state_dict()
    legacy = to_hf_state_dict(ours.state_dict(), cfg)
    both = {**legacy, "model.layers.1.mlp.experts.gate_up_proj": fused[
        "model.layers.1.mlp.experts.gate_up_proj"]}  # fmt: skip
    with pytest.raises(CheckpointError, match="both fused and per-expert"):
        from_hf_state_dict(both, cfg)
    del legacy["model.layers.2.mlp.experts.1.up_proj.weight"]
    with pytest.raises(CheckpointError) as err:
        from_hf_state_dict(legacy, cfg)
    assert "model.layers.2.mlp.experts.1.up_proj.weight" in str(err.value)
    bad = dict(fused)
    bad["model.layers.2.mlp.experts.down_proj"] = bad["model.layers.2.mlp.experts.down_proj"][:3]
    with pytest.raises(CheckpointError, match=r"model.layers.2.mlp.experts.down_proj .*\[3, "):
        from_hf_state_dict(bad, cfg)


def test_a_learned_expert_bias_is_not_exported():
    cfg, _ = VARIANTS["mixtral-window"]
    model = ours_random(cfg)
    model.layers["1"].moe.expert_bias[2] = 0.01  # aux-loss-free balancing moved it
    with pytest.raises(CheckpointError) as err:
        to_hf_state_dict(model.state_dict(), cfg)
    message = str(err.value)
    assert "layers.1.moe.expert_bias" in message and "changes which experts" in message
    assert "\n" not in message


MOE = dict(num_experts=4, top_k=2)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (ModelConfig(moe=MoEConfig(**MOE, score_func="sigmoid")), "model.moe.score_func 'sigmoid'"),
        (ModelConfig(moe=MoEConfig(**MOE, num_shared_experts=1)), "model.moe.num_shared_experts 1"),
        (ModelConfig(moe=MoEConfig(**MOE, route_scale=2.5)), "model.moe.route_scale 2.5"),
        (ModelConfig(moe=MoEConfig(**MOE, dense_layers=[0])), "dense blocks"),
        (ModelConfig(moe=MoEConfig(**MOE, norm_topk_prob=False)), "model.moe.norm_topk_prob false"),
        (ModelConfig(attention_bias=True, moe=MoEConfig(**MOE)), "model.attention_bias"),
        (ModelConfig(qk_norm=True, mlp_bias=True, moe=MoEConfig(**MOE, every=2)), "model.mlp_bias"),
    ],
)  # fmt: skip
def test_export_refuses_what_hf_moe_models_cannot_compute(cfg, message):
    for what in (to_hf_config, lambda c: to_hf_state_dict({}, c)):
        with pytest.raises(ConfigError) as err:
            what(cfg)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


HF = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2)  # fmt: skip


@pytest.mark.parametrize(
    "d, message",
    [
        ({"model_type": "mixtral", "num_local_experts": 4, "num_experts": 8},
         "num_experts 8 and num_local_experts 4 disagree"),
        ({"model_type": "mixtral", "num_local_experts": 2, "num_experts_per_tok": 3},
         "model.moe.top_k: 3 must be between 1 and model.moe.num_experts (2)"),
        ({"model_type": "qwen3_moe", "num_experts": 4, "decoder_sparse_step": 0},
         "decoder_sparse_step 0 is not a positive integer"),
        ({"model_type": "qwen3_moe", "num_experts": 4, "mlp_only_layers": [0, "1"]},
         "mlp_only_layers [0, \"1\"] is not a list of layer indices"),
        ({"model_type": "qwen3_moe", "num_experts": 4, "router_aux_loss_coef": -1},
         "router_aux_loss_coef -1 is not a finite number >= 0"),
        ({"model_type": "qwen2_moe", "num_experts": 4},
         "model_type 'qwen2_moe' is not supported: Qwen2-MoE adds a shared expert behind a "
         "sigmoid gate"),
        ({"model_type": "olmoe", "num_experts": 4}, "OLMoE normalises queries and keys"),
        ({"model_type": "deepseek_v3"}, "multi-head latent attention"),
    ],
)  # fmt: skip
def test_import_refuses_moe_configs_it_cannot_represent(d, message):
    with pytest.raises(ConfigError, match=r"^HF config: ") as err:
        from_hf_config({**HF, **d})
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_hub_config_defaults():
    """Keys left out take the HF class defaults: Mixtral's 1e6 RoPE base and 1e-5 epsilon,
    Qwen3-MoE's 128 experts, top-8 unnormalised, 768-wide experts."""
    mixtral = from_hf_config({**HF, "model_type": "mixtral"})
    assert (mixtral.rope_theta, mixtral.norm_eps, mixtral.max_seq_len) == (1e6, 1e-5, 131072)
    assert (mixtral.moe.num_experts, mixtral.moe.top_k, mixtral.moe.norm_topk_prob) == (8, 2, True)
    assert mixtral.expert_ffn_dim == 64 and mixtral.sliding_window is None
    hf = {k: v for k, v in HF.items() if k != "num_key_value_heads"}
    qwen = from_hf_config({**hf, "model_type": "qwen3_moe", "num_attention_heads": 8})
    assert (qwen.moe.num_experts, qwen.moe.top_k, qwen.expert_ffn_dim) == (128, 8, 768)
    assert not qwen.moe.norm_topk_prob and qwen.qk_norm and qwen.head_dim == 4
    assert (qwen.num_kv_heads, qwen.rope_theta, qwen.norm_eps) == (4, 10000.0, 1e-6)


def test_router_jitter_noise_imports_with_a_note():
    """Mixtral's jitter only multiplies the router's inputs by noise in HF's training mode."""
    d = {**HF, "model_type": "mixtral", "router_jitter_noise": 0.01}
    assert from_hf_config(d).moe.num_experts == 8
    (note,) = hf_config_notes(d)
    assert note.startswith("router_jitter_noise 0.01 is not applied")


# config.json of mistralai/Mixtral-8x7B-v0.1 and Qwen/Qwen3-30B-A3B as published (transformers 4).
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48,
    "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4,
    "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}  # fmt: skip


def test_published_configs_have_the_published_parameter_counts():
    """Mixtral 8x7B: 46.7B parameters, 12.9B active; Qwen3-30B-A3B: 30.5B, 3.3B active."""
    mixtral = from_hf_config(MIXTRAL_8X7B)
    assert (mixtral.num_params(), mixtral.num_params(active=True)) == (
        46_702_792_704,
        12_879_925_248,
    )
    assert mixtral.moe.aux_loss_coef == 0.02 and mixtral.sliding_window is None
    qwen = from_hf_config(QWEN3_30B_A3B)
    assert (qwen.num_params(), qwen.num_params(active=True)) == (30_532_122_624, 3_353_032_704)
    assert qwen.moe.norm_topk_prob and qwen.qk_norm and qwen.head_dim == 128
    for cfg in (mixtral, qwen):  # and back to the same fields
        exported = to_hf_config(cfg)
        original = MIXTRAL_8X7B if cfg is mixtral else QWEN3_30B_A3B
        for key, value in exported.items():
            if key in original and key not in ("architectures", "rope_scaling"):
                assert value == original[key], key
