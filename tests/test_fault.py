"""SLURM's walltime warning (SIGUSR1) stops every rank after the same step, with a checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from multiproc import REPO, free_port, read_metrics

TINY = str(REPO / "configs/tiny.yaml")


def start(tmp_path: Path, nproc: int, *extra: str) -> subprocess.Popen:
    args = [TINY, "--train.steps", "400", "--train.output_dir", str(tmp_path),
            "--train.run_name", "run", "--checkpoint.interval", "1000", *extra]  # fmt: skip
    if nproc == 1:
        cmd = [sys.executable, "-m", "eurotrain.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), "-m", "eurotrain.train", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout}s")


def worker_pids(torchrun_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(torchrun_pid)], capture_output=True, text=True)
    return sorted(int(p) for p in out.stdout.split())


def test_usr1_on_one_rank_stops_all_ranks_with_a_final_checkpoint(tmp_path: Path) -> None:
    proc = start(tmp_path, 2)
    run_dir = tmp_path / "run"
    wait_for_step(run_dir, 3, proc)
    workers = worker_pids(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGUSR1)  # only one rank hears it, as after a partial delivery
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested (a signal on another rank)" in out and "resubmit the same job" in out
    last = read_metrics(run_dir)[-1]["step"]
    assert 3 <= last < 400
    committed = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert committed == [f"step-{last:06d}"], committed

    # Resubmitting the same job resumes after that step.
    again = start(tmp_path, 1, "--train.steps", str(last + 2))
    out, _ = again.communicate(timeout=180)
    assert again.returncode == 0, out[-3000:]
    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps[-2:] == [last + 1, last + 2], steps[-5:]


def test_sigterm_stops_a_single_process_cleanly(tmp_path: Path) -> None:
    proc = start(tmp_path, 1)
    wait_for_step(tmp_path / "run", 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested (SIGTERM" in out
    assert any((tmp_path / "run" / "checkpoints").glob("step-*"))
