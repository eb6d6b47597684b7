"""The real command line under torchrun with a composed layout, as a user starts it."""

from __future__ import annotations

import math

from harness import COMMON, TINY
from multiproc import read_metrics, run_torchrun


def test_torchrun_pipeline_x_tensor_parallel(tmp_path):
    args = [TINY, *COMMON, "--train.output_dir", str(tmp_path), "--train.run_name", "cli"]
    args += ["--parallel.pp", "2", "--parallel.tp", "2", "--parallel.dp_shard", "1"]
    args += ["--logging.log_interval", "1"]
    proc = run_torchrun(4, args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_metrics(tmp_path / "cli")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_torchrun_bad_layout_exits_with_config_error(tmp_path):
    args = [TINY, *COMMON, "--train.output_dir", str(tmp_path), "--parallel.tp", "4"]
    proc = run_torchrun(2, args)
    assert proc.returncode != 0
    assert "configuration error" in proc.stderr and "parallel.tp" in proc.stderr
