"""The model against HF transformers (same weights -> same logits), and its construction."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from eurotrain.models import ModelConfig, RopeScaling, build_model
from eurotrain.models.hf import (
    from_hf_config,
    from_hf_state_dict,
    to_hf_config,
    to_hf_state_dict,
)

VARIANTS = {
    "llama2-mha": ModelConfig(num_kv_heads=None, max_seq_len=96),
    "llama3-gqa": ModelConfig(rope_theta=500000.0, max_seq_len=96),
    "llama3.1-rope-scaling-tied": ModelConfig(
        rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=32),
        tie_embeddings=True,
        max_seq_len=96,
    ),
    "qwen2-qkv-bias": ModelConfig(qkv_bias=True, num_kv_heads=1, rope_theta=1e6, max_seq_len=96),
}


def hf_twin(cfg: ModelConfig, seed: int = 7):
    ours = build_model(cfg, "cpu")
    ours.init_weights(seed)
    if cfg.qkv_bias:  # zero-initialised biases would not test the mapping
        with torch.no_grad():
            for name, p in ours.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    hf_cfg = AutoConfig.for_model(**to_hf_config(cfg))
    hf = AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=torch.float32).eval()
    result = hf.load_state_dict(
        to_hf_state_dict(ours.state_dict(), cfg.tie_embeddings), strict=False
    )
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= ({"lm_head.weight"} if cfg.tie_embeddings else set())
    return ours.eval(), hf


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_hf_transformers(variant: str) -> None:
    cfg = VARIANTS[variant]
    ours, hf = hf_twin(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-5, f"{variant}: max abs logit difference {diff}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_mapping_round_trips(variant: str) -> None:
    cfg = VARIANTS[variant]
    ours, hf = hf_twin(cfg)
    back = from_hf_config(hf.config.to_dict())
    assert back.num_params() == cfg.num_params()
    assert (back.rope_scaling, back.tie_embeddings, back.qkv_bias) == (
        cfg.rope_scaling,
        cfg.tie_embeddings,
        cfg.qkv_bias,
    )
    state = from_hf_state_dict(hf.state_dict(), cfg)
    for name, p in ours.state_dict().items():
        assert torch.equal(state[name], p), name


def test_loss_with_labels_is_summed_cross_entropy() -> None:
    cfg = VARIANTS["llama3-gqa"]
    model = build_model(cfg, "cpu")
    model.init_weights(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    labels = torch.randint(0, cfg.vocab_size, (2, 16))
    labels[0, :5] = -100
    logits = model(tokens)
    expected = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), reduction="sum"
    )
    torch.testing.assert_close(model(tokens, labels), expected)


def test_meta_build_then_init_equals_direct_init() -> None:
    cfg = ModelConfig()
    meta = build_model(cfg)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.init_weights(seed=3)
    direct = build_model(cfg, "cpu")
    direct.init_weights(seed=3)
    for (name, a), b in zip(meta.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(meta.rope_cos, direct.rope_cos)
    other = build_model(cfg, "cpu")
    other.init_weights(seed=4)
    assert not torch.equal(
        other.layers["0"].attention.wq.weight, direct.layers["0"].attention.wq.weight
    )


def test_param_count_matches_module() -> None:
    for cfg in VARIANTS.values():
        model = build_model(cfg)
        assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
