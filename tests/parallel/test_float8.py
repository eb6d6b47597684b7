"""FP8 training (torchao float8, eurotrain/parallel/float8.py), run on CPU through torchao's
emulation: which linears are converted, the losses against the run without FP8 (within what FP8's
3 mantissa bits allow), the same FP8 losses under FSDP2 with FP8 all-gather and under tensor
parallelism as in one process, and the refusals (no torchao, a device without FP8)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from checkpoint.ckpt_common import tiny_config
from multiproc import run_distributed

from eurotrain.configtools import ConfigError
from eurotrain.models.llama import build_model
from eurotrain.parallel.float8 import Float8Config, apply_float8, check_float8

FP8_RTOL = 2e-2
"""FP8 (e4m3) keeps 3 mantissa bits: ~6 % per element; the mean loss of the tiny model over a
few steps stays within 2 % of the higher-precision run (seen: 3e-4)."""
PARITY_RTOL = 1e-5
"""FP8 under FSDP2 / TP against FP8 in one process: the scales are global, so the same casts."""

STEPS = 4


def _float8(recipe: str, **extra: object) -> dict:
    return {"enabled": True, "emulate": True, "min_features": 16, "recipe": recipe, **extra}


def _train(out: Path, run: str, **sections: dict) -> list[float]:
    from eurotrain.train import Trainer

    sections.setdefault("logging", {"log_interval": 100})
    return Trainer(tiny_config(out, run, STEPS, **sections)).train().losses


def _layouts(rank: int, world: int, out: str, cases: list[tuple[str, dict]]) -> list[list]:
    return [
        _train(Path(out), f"fp8-{i}", float8=_float8(recipe), parallel=parallel)
        for i, (recipe, parallel) in enumerate(cases)
    ]


def test_chosen_linears_and_names(tmp_path):
    pytest.importorskip("torchao.float8")
    cfg = tiny_config(tmp_path, "x", 1).model
    model = build_model(cfg, "meta")
    names = {n for n, _ in model.named_parameters()}
    chosen = apply_float8(model, Float8Config(**_float8("tensorwise", exclude=["*.wk"])), False)
    assert "output" not in chosen and not any(n.endswith(".wk") for n in chosen)
    assert "layers.0.attention.wq" in chosen and "layers.1.feed_forward.w2" in chosen
    assert type(model.layers["0"].attention.wq).__name__ == "Float8Linear"
    assert type(model.layers["0"].attention.wk).__name__ == "Linear"
    assert {n for n, _ in model.named_parameters()} == names  # checkpoints unchanged
    # The default threshold keeps the tiny model's small linears (64..192 features) as they are.
    assert apply_float8(build_model(cfg, "meta"), Float8Config(enabled=True), False) == []


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_trains_like_higher_precision(tmp_path, recipe):
    pytest.importorskip("torchao.float8")
    base = _train(tmp_path, "base")
    fp8 = _train(tmp_path, "fp8", float8=_float8(recipe))
    assert len(fp8) == STEPS
    for a, b in zip(fp8, base):
        assert math.isclose(a, b, rel_tol=FP8_RTOL), (fp8, base)
    assert fp8 != base  # FP8 did run


def test_fp8_under_fsdp2_and_tp_matches_one_process(tmp_path):
    pytest.importorskip("torchao.float8")
    one = {r: _train(tmp_path, f"one-{r}", float8=_float8(r)) for r in ("tensorwise", "rowwise")}
    cases = [
        ("tensorwise", {"dp_shard": 2}),  # FP8 all-gather
        ("rowwise", {"dp_shard": 2}),
        ("tensorwise", {"tp": 2, "dp_shard": 1}),
    ]
    for rank_results in run_distributed(_layouts, 2, str(tmp_path), cases):
        for (recipe, parallel), losses in zip(cases, rank_results):
            for a, b in zip(losses, one[recipe]):
                assert math.isclose(a, b, rel_tol=PARITY_RTOL), (parallel, losses, one[recipe])


def test_refused_without_fp8_hardware_or_torchao(monkeypatch):
    pytest.importorskip("torchao.float8")
    with pytest.raises(ConfigError, match=r"float8.enabled: the run is on cpu, which has no FP8"):
        check_float8(Float8Config(enabled=True), torch.device("cpu"))
    check_float8(Float8Config(enabled=True, emulate=True), torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"float8.enabled needs torchao: pip install"):
        check_float8(Float8Config(enabled=True), torch.device("cpu"))


def test_moe_routers_stay_out_and_shared_experts_convert():
    pytest.importorskip("torchao.float8")
    from eurotrain.models import ModelConfig, MoEConfig

    moe = MoEConfig(num_experts=16, top_k=2, expert_ffn_dim=32, num_shared_experts=1)
    model = build_model(ModelConfig(num_layers=2, moe=moe), "meta")
    chosen = apply_float8(model, Float8Config(**_float8("tensorwise")), False)
    assert not any("router" in n for n in chosen), chosen  # 16 x 128 would qualify by size
    assert "layers.0.moe.shared.w1" in chosen and "layers.0.attention.wq" in chosen
    assert not any("experts" in n for n in chosen)
