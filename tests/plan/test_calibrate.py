"""`eurotrain plan --calibrate DIR`: `eurotrain bench` results replace the planner's defaults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from eurotrain.bench.results import new_results, write_results
from eurotrain.configtools import ConfigError
from eurotrain.plan.cli import main

REPO = Path(__file__).resolve().parents[2]
LLAMA_8B = str(REPO / "configs" / "llama3-8b.yaml")
PLAN = [LLAMA_8B, "--cluster", "mn5-acc", "--nodes", "2", "--steps", "1000", "--json"]


def comm(op: str, scope: str, nodes: int, ranks: int, size: int, busbw: float) -> dict[str, Any]:
    return {"op": op, "scope": scope, "nodes": nodes, "ranks": ranks, "bytes": size,
            "busbw_GBps": busbw}  # fmt: skip


def bench_dir(root: Path, name: str, cluster: str, comms: list, train: list) -> Path:
    results = new_results(cluster, "NVIDIA H100", 4, "nccl")
    results["comms"], results["train"] = comms, train
    write_results(root / name, results)
    return root


def test_measured_figures_replace_the_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench_dir(tmp_path, "comms", "mn5-acc", [
        comm("all_reduce", "intra", 1, 4, 1 << 20, 50.0),
        comm("all_gather", "intra", 1, 4, 1 << 30, 300.0),
        comm("reduce_scatter", "intra", 1, 4, 1 << 30, 280.0),
        comm("all_reduce", "inter", 2, 8, 1 << 30, 80.0),  # 4 ranks per node: 20 GB/s per GPU
        comm("send_recv", "inter", 2, 8, 1 << 30, 999.0),  # not a collective the plan uses
    ], [])  # fmt: skip
    bench_dir(tmp_path, "train", "mn5-acc", [], [
        {"nodes": 1, "tflops_per_gpu": 300.0, "mfu": 0.3, "step_time_s": 10.0, "compute_s": 8.0},
        {"nodes": 2, "tflops_per_gpu": 290.0, "mfu": 0.29, "step_time_s": 10.0, "compute_s": 7.0},
        {"nodes": 4, "tflops_per_gpu": None, "mfu": None},
    ])  # fmt: skip
    default = json.loads(capsys.readouterr().out) if main(PLAN) == 0 else {}
    assert main([*PLAN, "--calibrate", str(tmp_path)]) == 0
    calibrated = json.loads(capsys.readouterr().out)
    hw = calibrated["hardware"]
    assert hw["intra_GBps"] == 300.0 and hw["inter_GBps"] == 20.0
    assert hw["peak_tflops"] == pytest.approx(1000.0)  # 300 TFLOP/s at 30 % MFU
    assert hw["efficiency"] == pytest.approx((0.3 * 10 / 8 + 0.29 * 10 / 7) / 2)
    assert set(hw["sources"].values()) == {f"measured ({tmp_path})"}
    assert default["hardware"]["sources"]["efficiency"] == "default"
    assert calibrated["recommended"]["mfu"] != default["recommended"]["mfu"]


def test_results_of_another_cluster_or_none_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no bench\.json"):
        main([*PLAN, "--calibrate", str(tmp_path)])
    bench_dir(tmp_path, "x", "lumi-g", [comm("all_reduce", "intra", 1, 8, 1 << 30, 90.0)], [])
    with pytest.raises(ConfigError, match="measured on 'lumi-g', not on --cluster mn5-acc"):
        main([*PLAN, "--calibrate", str(tmp_path)])
    (tmp_path / "x" / "bench.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"not a readable bench result"):
        main([*PLAN, "--calibrate", str(tmp_path)])
