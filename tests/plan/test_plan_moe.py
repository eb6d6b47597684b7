"""The planner on mixture-of-experts models (docs/planner.md): expert parallelism enumerated,
its memory and all-to-all time, a plan for Qwen3-30B-A3B (pure CPU arithmetic: no model is
built; the memory model is checked against real MoE steps in test_memory_validation.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from eurotrain.config import load_config
from eurotrain.configtools import ConfigError
from eurotrain.parallel.checks import check_layout
from eurotrain.parallel.config import ParallelConfig
from eurotrain.plan.cli import main
from eurotrain.plan.hardware import Hardware
from eurotrain.plan.layouts import candidates
from eurotrain.plan.memory import COMMUNICATOR_BYTES, GIB, Setting, estimate
from eurotrain.plan.speed import step_time

REPO = Path(__file__).resolve().parents[2]
QWEN3_MOE = str(REPO / "configs" / "qwen3-30b-a3b.yaml")
TINY_MOE = str(REPO / "configs" / "tiny-moe.yaml")
HW = Hardware("test", "NVIDIA H100", 8, 80, 1000.0, 400.0, 50.0)


def qwen3(*overrides: str) -> Any:
    return load_config(QWEN3_MOE, ["--parallel.dp_shard", "64", *overrides])


def test_qwen3_moe_plan_fits_with_expert_parallelism(capsys: pytest.CaptureFixture[str]) -> None:
    args = [QWEN3_MOE, "--cluster", "leonardo-booster", "--nodes", "8,16", "--tokens", "1e11",
            "--top", "200"]  # fmt: skip
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["active_params"] < out["params"] / 8  # 3.3B of 30.5B
    rows = [r for rows in out["layouts"].values() for r in rows]
    with_ep = [r for r in rows if r["overrides"].get("parallel.ep", 1) > 1]
    assert with_ep, "no fitting layout with expert parallelism"
    for row in with_ep:
        assert row["fits"] and row["memory_gib"]["total"] <= out["hardware"]["usable_gib"]
        assert f"ep={row['overrides']['parallel.ep']}" in row["layout"]
        assert row["step_breakdown_s"]["ep"] > 0
        # the memory reported is the layout's, as the overrides give it
        words = [w for k, v in row["overrides"].items() for w in (f"--{k}", str(v))]
        cfg = load_config(QWEN3_MOE, words)
        dims = check_layout(cfg, row["nodes"] * 4, cuda=True)
        total = estimate(cfg, dims, Setting(cuda=True)).total
        assert round(total / GIB, 3) == row["memory_gib"]["total"]
    # the table says how many parameters are active
    assert main([*args[:4], "8", *args[5:], "--top", "1"]) == 0
    assert "30.53B parameters (3.35B active)" in capsys.readouterr().out


def test_expert_parallel_degrees_enumerated() -> None:
    cfg = load_config(
        TINY_MOE, ["--train.global_batch_size", "64", "--model.moe.num_experts", "12"]
    )
    cands, _ = candidates(cfg, 8, 8)
    # (without pipelining or replicas: the layouts every ep must accept)
    fsdp = [c for c in cands if c.dims.pp == 1 and c.dims.dp_replicate == 1]
    seen = {(c.dims.dp_shard, c.cfg.parallel.ep) for c in fsdp}
    for dp_shard in {d for d, _ in seen}:
        # divisors of dp_shard that divide the 12 experts
        expected = {e for e in (1, 2, 4, 8) if dp_shard % e == 0 and 12 % e == 0}
        assert {e for d, e in seen if d == dp_shard} == expected
    assert (8, 4) in seen and (8, 8) not in seen
    # a dense model keeps ep = 1 and no ep override
    dense, _ = candidates(load_config(str(REPO / "configs" / "tiny.yaml")), 8, 8)
    assert {c.cfg.parallel.ep for c in dense} == {1}
    assert not any("parallel.ep" in c.overrides for c in dense)


def test_expert_parallelism_memory() -> None:
    """Experts split over ep and FSDP-sharded over the rest of dp_shard: the same master
    weights per rank, but unsharded gradients (accumulation) and gathered blocks of E / ep
    experts only."""
    by_ep = {}
    for ep in (1, 8):
        cfg = qwen3("--parallel.ep", str(ep), "--train.micro_batch_size", "1")
        by_ep[ep] = estimate(cfg, check_layout(cfg, 64, cuda=True), Setting(cuda=True))
    one, eight = by_ep[1], by_ep[8]
    assert (one.params, one.optimizer) == (eight.params, eight.optimizer)
    m = qwen3().model
    experts = m.num_layers * m.moe.num_experts * 3 * m.dim * m.expert_ffn_dim
    # fp32 gradients of every expert this rank holds, kept over 8 micro-batches, and the
    # running block's unsharded bf16 ones
    block = experts // m.num_layers
    assert one.grads - eight.grads == pytest.approx((experts * 4 + block * 2) * 7 / 8)
    assert one.gathered > eight.gathered
    # the all-to-all's bf16 send and receive buffers are alive after the combine's fp32
    # gradients are freed, never with them: the backward's workspace does not grow
    assert eight.workspace == one.workspace
    # two more communicators: the ep group and the experts' FSDP group
    assert eight.runtime == one.runtime + 2 * COMMUNICATOR_BYTES
    with pytest.raises(ConfigError, match=r"parallel\.ep: 0"):
        ParallelConfig(ep=0)


def test_all_to_all_time() -> None:
    def timed(ep: int, hw: Hardware = HW) -> Any:
        cfg = qwen3("--parallel.ep", str(ep))
        return step_time(cfg, check_layout(cfg, 64, cuda=True), hw)

    assert timed(1).ep_s == 0
    m, local_tokens = qwen3().model, 512 * 4096 // 64
    # 48 MoE blocks, 4 all-to-alls of [tokens x 8, 2048] bf16 rows, 7/8 leaving the rank, NVLink
    volume = 48 * 4 * local_tokens * m.moe.top_k * m.dim * 2 * 7 / 8
    within = timed(8)
    assert within.ep_s == pytest.approx(volume / (HW.intra_GBps * 1e9))
    # 16 ranks span two nodes of 8: the NICs
    across = timed(16)
    assert across.ep_s == pytest.approx(volume * (15 / 16) / (7 / 8) / (HW.inter_GBps * 1e9))
    assert across.total_s > within.total_s
    # compute and MFU count the active parameters
    assert within.model_flops == m.flops_per_token(4096) * 512 * 4096
    assert within.model_flops < 6 * m.num_params() * 512 * 4096 / 5


def test_selective_checkpointing_recomputes_the_experts() -> None:
    """parallel/ac.py keeps mm/addmm/bmm outputs, not the experts' grouped matmuls: their
    forward runs again in backward (hardware FLOPs, not model FLOPs)."""
    cfg = qwen3("--parallel.activation_checkpointing", "selective")
    st = step_time(cfg, check_layout(cfg, 64, cuda=True), HW)
    m, tokens = cfg.model, 512 * 4096
    experts = m.num_layers * 2 * m.moe.top_k * 3 * m.dim * m.expert_ffn_dim * tokens
    assert st.hardware_flops == pytest.approx(st.model_flops + experts)
    none = qwen3("--parallel.activation_checkpointing", "none")
    assert step_time(none, check_layout(none, 64, cuda=True), HW).hardware_flops == (st.model_flops)
