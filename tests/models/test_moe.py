"""The mixture-of-experts block in one process: routing against a per-token reference, the
grouped matmul against the loop, the aux loss's gradient, load counting under activation
checkpointing, the selection bias, and the config's refusals."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from eurotrain.config import load_config
from eurotrain.errors import ConfigError
from eurotrain.models import ModelConfig, build_model
from eurotrain.models import moe as moe_module
from eurotrain.models.config import MoEConfig
from eurotrain.models.moe import moe_layers
from eurotrain.parallel.ac import apply_ac


def tiny(**moe) -> ModelConfig:
    fields = {"num_experts": 4, "top_k": 2, "expert_ffn_dim": 48, **moe}
    return ModelConfig(dim=64, num_layers=2, ffn_dim=96, max_seq_len=32, moe=MoEConfig(**fields))


def built(cfg: ModelConfig, seed: int = 0):
    model = build_model(cfg, "cpu")
    model.init_weights(seed)
    return model


def reference(layer, x: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """Token by token, expert by expert, as the papers write it."""
    logits = F.linear(x, layer.router.weight).float()
    scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
    chosen = (scores + layer.expert_bias).topk(cfg.top_k, -1).indices
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        weights = scores[t, chosen[t]]
        if cfg.norm_topk_prob:
            weights = weights / weights.sum()
        for e, w in zip(chosen[t].tolist(), weights * cfg.route_scale):
            ex = layer.experts
            h = F.silu(ex.w1[e] @ x[t]) * (ex.w3[e] @ x[t])
            out[t] += w * (ex.w2[e] @ h)
    if layer.shared is not None:
        out += layer.shared(x)
    return out


@pytest.mark.parametrize(
    "moe",
    [
        {},
        {"score_func": "sigmoid", "route_scale": 2.5, "num_shared_experts": 1},
        {"norm_topk_prob": False, "top_k": 1},
        {"top_k": 4, "num_shared_experts": 2},
    ],
    ids=["softmax", "sigmoid-shared-scaled", "top1-unnormalised", "all-experts-2-shared"],
)
def test_block_matches_the_per_token_reference(moe):
    cfg = tiny(**moe)
    layer = moe_layers(built(cfg))["layers.0.moe"]
    layer.expert_bias.copy_(torch.tensor([0.0, 0.3, -0.2, 0.1]))  # also a biased choice
    x = torch.randn(1, 12, cfg.dim)
    with torch.no_grad():
        got = layer(x)[0]
    torch.testing.assert_close(got, reference(layer, x[0], cfg.moe), atol=1e-5, rtol=1e-5)


def test_grouped_matmul_and_the_loop_give_the_same_loss_and_gradients(monkeypatch):
    cfg = tiny(num_shared_experts=1, aux_loss_coef=0.1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    grads = []
    for grouped in (True, False):
        if not grouped:
            monkeypatch.setattr(moe_module, "_grouped_mm_works", lambda x, w: False)
        model = built(cfg)
        loss = model(tokens, tokens)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grad_a), (loss_b, grad_b) = grads
    torch.testing.assert_close(loss_a, loss_b)
    for name in grad_a:
        torch.testing.assert_close(grad_a[name], grad_b[name], msg=name)


def test_aux_loss_gradient_is_the_gradient_of_the_weighted_loss_and_not_in_its_value():
    """The block adds coef * (tokens / global tokens) * aux to what backward differentiates;
    the loss the model returns stays the cross-entropy alone."""
    coef, global_tokens = 0.5, 64.0
    cfg = tiny(aux_loss_coef=coef)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))

    model = built(cfg)
    moe_module.set_aux_loss_scale(moe_layers(model).values(), 1.0 / global_tokens)
    loss = model(tokens, tokens)
    (loss / global_tokens).backward()
    injected = {n: p.grad.clone() for n, p in model.named_parameters()}

    explicit = built(cfg.__class__(**{**cfg.__dict__, "moe": tiny().moe}))  # same weights, no aux
    auxes = []
    for layer in moe_layers(explicit).values():
        route = layer.route

        def spy(x, route=route, layer=layer):
            idx, weights, scores = route(x)
            counts = torch.bincount(idx.flatten(), minlength=layer.num_experts)
            aux, tokens = layer.aux_loss(counts, scores)
            auxes.append(tokens * aux)
            return idx, weights, scores

        layer.route = spy
    plain = explicit(tokens, tokens)
    torch.testing.assert_close(plain, loss.detach())
    ((plain + coef * sum(auxes)) / global_tokens).backward()
    for name, p in explicit.named_parameters():
        torch.testing.assert_close(injected[name], p.grad, msg=name)
    assert any(injected[n].abs().sum() > 0 for n in injected if "router" in n)


def test_balanced_routing_has_aux_loss_one():
    layer = moe_layers(built(tiny()))["layers.0.moe"]
    counts = torch.tensor([2, 2, 2, 2])
    scores = torch.full((4, 4), 0.25)
    assert layer.aux_loss(counts, scores)[0].item() == pytest.approx(1.0)


def test_loads_are_counted_once_per_forward_with_checkpointing_and_not_in_eval():
    cfg = tiny()
    model = built(cfg)
    apply_ac(model, "full", 1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    model(tokens, tokens).backward()  # backward recomputes each block's forward
    for layer in moe_layers(model).values():
        assert layer.tokens_per_expert.sum().item() == 2 * 8 * cfg.moe.top_k
    model.eval()
    with torch.no_grad():
        model(tokens)
    for layer in moe_layers(model).values():
        assert layer.tokens_per_expert.sum().item() == 2 * 8 * cfg.moe.top_k


def test_selection_bias_chooses_but_does_not_weigh():
    cfg = tiny(top_k=1)
    layer = moe_layers(built(cfg))["layers.0.moe"]
    x = torch.randn(6, cfg.dim)
    layer.expert_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))  # expert 2 wins every token
    idx, weights, scores = layer.route(x)
    assert idx.flatten().tolist() == [2] * 6
    torch.testing.assert_close(weights, torch.ones_like(weights))  # renormalised top-1
    layer.norm_topk_prob = False
    _, weights, scores = layer.route(x)
    torch.testing.assert_close(weights[:, 0], scores[:, 2])  # the score, not score + bias


def test_dense_layers_and_every_choose_the_moe_blocks():
    cfg = ModelConfig(num_layers=6, moe=MoEConfig(num_experts=4, every=2, dense_layers=[3]))
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]
    model = build_model(cfg)
    assert sorted(moe_layers(model)) == ["layers.1.moe", "layers.5.moe"]
    assert model.layers["0"].feed_forward is not None and model.layers["1"].feed_forward is None
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_flops_count_active_parameters():
    cfg = load_config("configs/qwen3-30b-a3b.yaml").model
    assert cfg.num_params() / 1e9 == pytest.approx(30.53, abs=0.01)  # HF Qwen3-30B-A3B
    active = cfg.num_params(exclude_embedding=True, active=True)
    assert active / 1e9 == pytest.approx(3.04, abs=0.01)
    assert cfg.flops_per_token(4096) == pytest.approx(
        6 * active + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * 4096
    )


@pytest.mark.parametrize(
    "moe, words",
    [
        ({"num_experts": 4, "top_k": 5}, ["model.moe.top_k: 5", "(4)"]),
        ({"num_experts": -1}, ["model.moe.num_experts: -1"]),
        ({"num_experts": 4, "every": 0}, ["model.moe.every: 0"]),
        ({"num_experts": 4, "aux_loss_coef": -0.1}, ["model.moe.aux_loss_coef: -0.1"]),
    ],
)
def test_bad_moe_settings_are_one_line(moe, words):
    with pytest.raises(ConfigError) as err:
        MoEConfig(**moe)
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words)


def test_dense_layers_outside_the_model_are_refused():
    with pytest.raises(ConfigError, match=r"model.moe.dense_layers: \[7\]"):
        ModelConfig(num_layers=4, moe=MoEConfig(num_experts=4, dense_layers=[0, 7]))


def test_training_logs_expert_loads_and_moves_the_bias(tmp_path):
    from eurotrain.train import Trainer

    cfg = load_config(
        "configs/tiny-moe.yaml",
        [
            "--train.steps", "3", "--train.output_dir", str(tmp_path), "--train.run_name", "m",
            "--data.seq_len", "32", "--train.global_batch_size", "4",
            "--train.micro_batch_size", "2", "--train.device", "cpu",
            "--logging.log_interval", "3", "--logging.progress", "lines",
        ],
    )  # fmt: skip
    trainer = Trainer(cfg)
    trainer.train()
    record = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").open()][-1]
    loads = record["moe_expert_load"]
    assert sorted(loads) == ["1", "2", "3"]  # block 0 is dense in tiny-moe
    assert all(len(v) == 8 and sum(v) == pytest.approx(1.0, abs=1e-3) for v in loads.values())
    assert record["moe_load_max"] >= 1.0 >= record["moe_load_min"]
    assert 0.5 < record["moe_aux_loss"] < 8.0  # 1.0 balanced, E = 8 all on one expert
    # Three updates of at most 0.001 each: the biases moved, by at most 0.003.
    bias = torch.stack([m.expert_bias for m in moe_layers(trainer.model).values()])
    assert 0 < bias.abs().max().item() <= 0.003 + 1e-7
    assert record["moe_bias_range"] == pytest.approx(
        (bias.max(-1).values - bias.min(-1).values).max().item()
    )
