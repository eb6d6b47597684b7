"""The model against HF transformers (same weights -> same logits and the same greedy
generations), and its construction."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from eurotrain.errors import ConfigError
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
    "qwen2-sliding-window": ModelConfig(qkv_bias=True, sliding_window=24, max_seq_len=96),
    "qwen3-qk-norm": ModelConfig(qk_norm=True, head_dim=16, rope_theta=1e6, max_seq_len=96),
    "qwen3-qk-norm-bias-window": ModelConfig(
        qk_norm=True, attention_bias=True, sliding_window=20, max_seq_len=96
    ),
    "mistral-sliding-window": ModelConfig(sliding_window=16, head_dim=16, max_seq_len=96),
    "llama-attention-mlp-bias": ModelConfig(attention_bias=True, mlp_bias=True, max_seq_len=96),
}
HF_TYPES = {  # the model_type each variant exports to
    "llama2-mha": "llama",
    "llama3-gqa": "llama",
    "llama3.1-rope-scaling-tied": "llama",
    "qwen2-qkv-bias": "qwen2",
    "qwen2-sliding-window": "qwen2",
    "qwen3-qk-norm": "qwen3",
    "qwen3-qk-norm-bias-window": "qwen3",
    "mistral-sliding-window": "mistral",
    "llama-attention-mlp-bias": "llama",
}
GENERATE = [
    "qwen3-qk-norm",
    "qwen3-qk-norm-bias-window",
    "mistral-sliding-window",
    "qwen2-sliding-window",
]


def hf_twin(cfg: ModelConfig, seed: int = 7):
    ours = build_model(cfg, "cpu")
    ours.init_weights(seed)
    # Zero-initialised biases and norm weights of ones would not test the mapping.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1, generator=gen)
            elif "norm" in name:
                p.uniform_(0.5, 1.5, generator=gen)
    hf_cfg = AutoConfig.for_model(**to_hf_config(cfg))
    hf = AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=torch.float32).eval()
    result = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
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


@pytest.mark.parametrize("variant", GENERATE)
def test_greedy_generation_matches_hf_transformers(variant: str) -> None:
    """30 greedy tokens after a 6-token prompt: past every sliding window, through HF's KV
    cache (windowed where the model has a window) against our full recomputation."""
    cfg = VARIANTS[variant]
    ours, hf = hf_twin(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
    new = 30
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        got = prompt
        for _ in range(new):
            next_token = ours(got)[:, -1].argmax(-1, keepdim=True)
            got = torch.cat([got, next_token], dim=1)
    assert torch.equal(got, want), f"{variant}: first difference at {(got != want).nonzero()[:1]}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_mapping_round_trips(variant: str) -> None:
    cfg = VARIANTS[variant]
    ours, hf = hf_twin(cfg)
    assert hf.config.model_type == HF_TYPES[variant]
    back = from_hf_config(hf.config.to_dict())
    assert back.num_params() == cfg.num_params()
    for key in (
        "rope_scaling", "tie_embeddings", "qkv_bias", "attention_bias", "mlp_bias", "qk_norm",
        "sliding_window",
    ):  # fmt: skip
        assert getattr(back, key) == getattr(cfg, key), key
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


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(sliding_window=8, mlp_bias=True), "model: model.mlp_bias has no place in HF's "
         "MistralForCausalLM (the closest HF model); export is refused"),
        (dict(sliding_window=8, attention_bias=True), "model.attention_bias has no place in HF's "
         "MistralForCausalLM"),
        (dict(qk_norm=True, qkv_bias=True), "q/k/v biases without an o_proj bias "
         "(model.qkv_bias) has no place in HF's Qwen3ForCausalLM"),
        (dict(qk_norm=True, mlp_bias=True), "model.mlp_bias has no place in HF's Qwen3For"),
    ],
)  # fmt: skip
def test_export_refuses_what_hf_has_no_place_for(changes: dict, message: str) -> None:
    cfg = ModelConfig(**changes)
    for export in (to_hf_config, lambda c: to_hf_state_dict({}, c)):
        with pytest.raises(ConfigError) as err:
            export(cfg)
        assert message in str(err.value) and "\n" not in str(err.value)
