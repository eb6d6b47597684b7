"""`eurotrain launch --cluster local` submitted to a real two-node SLURM trains the tiny model."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _launch(slurm: dict[str, str], tmp: Path, launcher: str, gpus: int) -> tuple[str, str]:
    cmd = [
        sys.executable, "-m", "eurotrain", "launch",
        "--cluster", "local", "--nodes", "2", "--gpus-per-node", str(gpus),
        "--time", "00:10:00", "--launcher", launcher, "--wait",
        "--log-dir", str(tmp / "logs"),
        str(REPO / "configs" / "tiny.yaml"),
        "--train.steps", "3", "--train.micro_batch_size", "4",
        "--train.output_dir", str(tmp / "runs"), "--train.run_name", launcher,
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp, env=slurm, capture_output=True, text=True, timeout=300)
    job = re.search(r"submitted job (\d+)", out.stdout)
    logs = "\n".join(p.read_text() for p in (tmp / "logs").glob("*.out"))
    assert out.returncode == 0 and job, f"{out.stdout}\n{out.stderr}\n{logs}"
    info = subprocess.run(
        ["scontrol", "show", "job", job.group(1)], env=slurm, capture_output=True, text=True
    ).stdout
    return info, logs


def _check_run(tmp: Path, name: str, world: int, logs: str) -> None:
    assert f"on {world} x cpu" in logs, logs
    lines = (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]


@pytest.mark.slow
def test_srun_launcher_trains_across_two_nodes(slurm, tmp_path):
    info, logs = _launch(slurm, tmp_path, "srun", gpus=2)
    assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, info
    assert re.search(r"\bNodeList=node\[1-2\]", info), info
    assert "on 2 node(s): node[1-2]" in logs and "rendezvous 127.0.0.1:" in logs
    _check_run(tmp_path, "srun", world=4, logs=logs)
    script = next((tmp_path / "logs").glob("*.sbatch")).read_text()
    assert "--signal=B:USR1@300" in script and sys.executable in script


@pytest.mark.slow
def test_torchrun_launcher_trains_across_two_nodes(slurm, tmp_path):
    info, logs = _launch(slurm, tmp_path, "torchrun", gpus=1)
    assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, info
    assert re.search(r"\bNodeList=node\[1-2\]", info), info
    _check_run(tmp_path, "torchrun", world=2, logs=logs)
