"""The planner's step-time model: its parts behave as docs/planner.md states, and its scaling
shape matches a published run (benchmarks/plan_anchors.py; predicted vs published in
benchmarks/RESULTS.md)."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from eurotrain.config import load_config
from eurotrain.parallel.checks import check_layout
from eurotrain.plan.hardware import EFFICIENCY, Hardware, default_efficiency
from eurotrain.plan.speed import StepTime, step_time, throughput

REPO = Path(__file__).resolve().parents[2]
HW = Hardware("test", "NVIDIA H100", 8, 80, 1000.0, 400.0, 50.0)
LLAMA_8B = str(REPO / "configs" / "llama3-8b.yaml")


def timed(world: int, *overrides: str, hw: Hardware = HW) -> StepTime:
    cfg = load_config(LLAMA_8B, ["--train.global_batch_size", "64", *overrides])
    return step_time(cfg, check_layout(cfg, world, cuda=True), hw)


def test_compute_mfu_and_budget_add_up() -> None:
    cfg = load_config(LLAMA_8B, ["--train.global_batch_size", "64"])
    dims = check_layout(cfg, 8, cuda=True)
    st = step_time(cfg, dims, HW)
    flops = cfg.model.flops_per_token(8192) * 64 * 8192
    assert st.compute_s == pytest.approx(flops / 8 / (1000e12 * HW.efficiency))
    tp = throughput(st, dims, HW, steps=100)
    assert tp.mfu == pytest.approx(tp.tflops_per_gpu / 1000)
    assert tp.gpu_hours == pytest.approx(100 * st.total_s * 8 / 3600)
    assert tp.node_hours == pytest.approx(tp.gpu_hours / 8)


def test_full_checkpointing_recomputes_a_forward_of_the_blocks() -> None:
    none, full = timed(8), timed(8, "--parallel.activation_checkpointing", "full")
    assert 1.25 < full.compute_s / none.compute_s < 1 / 3 + 1
    assert full.model_flops == none.model_flops  # MFU counts the model, not the recomputation
    selective = timed(8, "--parallel.activation_checkpointing", "selective")
    assert selective.compute_s == none.compute_s


def test_bubble_by_schedule() -> None:
    pp = ["--parallel.pp", "4", "--parallel.dp_shard", "2", "--model.tie_embeddings", "false"]
    one = timed(8, *pp, "--parallel.pp_schedule", "1f1b")
    inter = timed(8, *pp, "--parallel.pp_schedule", "interleaved_1f1b",
                  "--parallel.pp_virtual_stages", "2")  # fmt: skip
    zbv = timed(8, *pp, "--parallel.pp_schedule", "zbv")
    micro = 64 // 2  # per data-parallel rank, micro-batch 1
    busy = one.compute_s + one.tp_s + one.cp_s
    assert one.bubble_s == pytest.approx(busy * 3 / micro)
    # the multi-stage schedules' bubbles come from running PyTorch's order of every rank's
    # actions: interleaved 1F1B's is the formula's, (p - 1) / (v m); splitting the backward
    # into I and W leaves a third of it
    assert inter.bubble_s == pytest.approx(one.bubble_s / 2)
    assert zbv.bubble_s == pytest.approx(inter.bubble_s / 3)
    izb = timed(8, *pp, "--parallel.pp_schedule", "interleaved_zb",
                "--parallel.pp_virtual_stages", "2")  # fmt: skip
    assert izb.bubble_s == pytest.approx(inter.bubble_s / 3)


def test_communication_on_the_links_it_crosses() -> None:
    assert timed(8).tp_s == 0 and timed(8).cp_s == 0
    tp = timed(8, "--parallel.tp", "4", "--parallel.dp_shard", "2")
    assert tp.tp_s > 0
    # the replicas' all-reduce crosses nodes: slower NICs, more exposed time
    slow = replace(HW, inter_GBps=0.5)
    hsdp = ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "8"]
    assert timed(16, *hsdp, hw=slow).dp_s > timed(16, *hsdp).dp_s >= 0


def _anchors():
    # Loaded from its file: benchmarks/ on sys.path would make its checkpoint.py shadow the
    # tests' checkpoint helpers in every process started after this test module was collected.
    if "plan_anchors" in sys.modules:
        return sys.modules["plan_anchors"]
    spec = importlib.util.spec_from_file_location(
        "plan_anchors", REPO / "benchmarks/plan_anchors.py"
    )
    assert spec is not None and spec.loader is not None
    anchors = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = anchors  # its dataclasses look their module up there
    spec.loader.exec_module(anchors)
    return anchors


def test_scaling_shape_matches_torchtitan() -> None:
    """8 -> 128 H100 with FSDP: published 5,762 -> 5,605 tokens/s per GPU (-2.7 %)."""
    anchors = _anchors()
    small, large = anchors.ANCHORS[0], anchors.ANCHORS[1]
    assert anchors.predict(large) / anchors.predict(small) == pytest.approx(5605 / 5762, rel=0.05)


def test_default_efficiencies_are_read_from_their_source_runs() -> None:
    """The device defaults are what the planner itself needs to reproduce fms-fsdp's eager 7B
    runs (benchmarks/plan_anchors.py): a change to the speed model that moves them must move
    the defaults with it."""
    anchors = _anchors()
    sources = [a for a in anchors.ANCHORS if a.role == "default"]
    assert {a.hardware.device for a in sources} == {"NVIDIA A100 80GB", "NVIDIA H100 80GB"}
    for a in sources:
        assert anchors.predict(a) == pytest.approx(a.published, rel=0.01), a.name
    assert default_efficiency("NVIDIA GH200 (H100 96GB)") == default_efficiency("NVIDIA H100")
    assert default_efficiency("AMD MI250X GCD") == EFFICIENCY  # no source run: the fallback


def test_another_frameworks_recomputation_is_priced() -> None:
    """torchtitan's op-level selective checkpointing recomputes wk, wo and w3 of every block:
    the extra FLOPs per token add compute time in proportion, and nothing else."""
    anchors = _anchors()
    cfg = load_config(LLAMA_8B, ["--train.global_batch_size", "64"])
    dims = check_layout(cfg, 8, cuda=True)
    m = cfg.model
    extra = anchors.torchtitan_op_sac(m)
    assert extra == 32 * 2 * (4096 * 1024 + 4096 * 4096 + 4096 * 14336)
    plain, priced = step_time(cfg, dims, HW), step_time(cfg, dims, HW, extra)
    assert priced.model_flops == plain.model_flops
    tokens = 64 * cfg.data.seq_len
    assert priced.hardware_flops == pytest.approx(plain.hardware_flops + extra * tokens)
    assert priced.compute_s / plain.compute_s == pytest.approx(
        priced.hardware_flops / plain.hardware_flops
    )
