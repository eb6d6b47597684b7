"""The checkpoint benchmarks (checkpoint.py, checkpoint_items.py, checkpoint_metadata.py) keep
working: tiny runs end to end print every figure and ratio (no timing is asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


NUMBER = r"[0-9]+\.[0-9]+"


def test_checkpoint_benchmark_prints_its_ratios(tmp_path):
    out = _run(
        "checkpoint.py", "--params", "1e6", "--runs", "1", "--steps", "3", "--dir", str(tmp_path)
    )
    for pattern in (
        rf"save / dd throughput: min {NUMBER} / median {NUMBER}; all runs together: dd "
        rf"{NUMBER} s, save {NUMBER} s = {NUMBER} x dd",
        rf"checksum of the file +{NUMBER} GB/s",
        rf"verify full +{NUMBER} s/GB",
        rf"load \(safe reader\) +{NUMBER} GB/s .* = {NUMBER} x DCP's FileSystemReader",
        rf"async / sync stall \(loop time over the loop without saves\): min {NUMBER}",
        rf"the loop without saves, 2 times: {NUMBER}-{NUMBER} s \(its own spread",
        rf"stall loop step: [0-9]+ matmuls \(~{NUMBER} s; --matmuls auto: 20 x the update\) "
        rf"then the update of every parameter \(~{NUMBER} s\): compute {NUMBER} x the update",
    ):
        assert re.search(pattern, out), (pattern, out)
    assert list(tmp_path.iterdir()) == []  # its scratch directory is gone


def test_checkpoint_benchmark_refuses_a_step_it_cannot_run(tmp_path):
    for bad in (["--matmuls", "many"], ["--matmuls", "-1"], ["--compute-ratio", "0"]):
        out = subprocess.run(
            [sys.executable, "benchmarks/checkpoint.py", "--dir", str(tmp_path), *bad],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 2 and "error:" in out.stderr, (bad, out.stderr)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_items_benchmark_prints_its_ratios(tmp_path):
    args = ("--layers", "2", "--runs", "1", "--loop-s", "0.1", "--dir", str(tmp_path))
    out = _run("checkpoint_items.py", *args)
    for pattern in (
        r"2 layers: 21 parameters, [0-9]+ items",
        rf"median: eurotrain {NUMBER} s = {NUMBER} x torch.save for every item",
        rf"median loop stall: eurotrain -?{NUMBER} s",
        rf"median load: eurotrain {NUMBER} s = {NUMBER} x as fast as DCP's FileSystemReader",
    ):
        assert re.search(pattern, out), (pattern, out)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_metadata_benchmark_prints_its_ratio():
    out = _run("checkpoint_metadata.py", "--tensors", "10", "--ranks", "8", "--runs", "1")
    assert "80 storage entries" in out, out
    assert re.search(rf"checks {NUMBER} s = {NUMBER}x pickle.loads", out), out
