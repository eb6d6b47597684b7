"""`eurotrain doctor` on this machine, healthy and with a planted fault, across 2 real ranks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from multiproc import free_port

from eurotrain import doctor
from eurotrain.doctor import main
from eurotrain.parallel.ac import inductor_cpu_problem

REPO = Path(__file__).resolve().parents[2]


def _doctor_torchrun(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(free_port()), "-m", "eurotrain", "doctor", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}
    env.pop("SLURM_JOB_ID", None)
    return env


def test_doctor_passes_here_single_rank(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    # The free-space warning is tested below: this machine's free disk is not this test's input
    monkeypatch.setattr(doctor, "MIN_FREE_GIB", 0.0)
    rc = main(["--cluster", "local", "--checkpoint-dir", str(tmp_path / "ck"),
               "--wandb-dir", str(tmp_path / "wb")])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "[PASS] versions" in out and "[PASS] checkpoint dir" in out and "[FAIL]" not in out


def test_doctor_warns_of_little_free_space_for_checkpoints(tmp_path, capsys, monkeypatch):
    free = shutil.disk_usage(tmp_path).free / 2**30
    monkeypatch.setattr(doctor, "MIN_FREE_GIB", free + 1000.0)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    rc = main(["--cluster", "local", "--checkpoint-dir", str(tmp_path / "ck"),
               "--wandb-dir", str(tmp_path / "wb")])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out  # a warning, not a failure
    assert "[WARN] checkpoint dir: " in out and " GiB free" in out
    assert "fix: free space or keep fewer checkpoints" in out


def test_doctor_two_ranks_healthy(tmp_path):
    out = _doctor_torchrun(
        ["--cluster", "local", "--checkpoint-dir", str(tmp_path / "ck"),
         "--wandb-dir", str(tmp_path / "wb")],
        _env(GLOO_SOCKET_IFNAME="lo"),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "eurotrain doctor: 2 rank(s)" in out.stdout
    assert "identical on 2 rank(s)" in out.stdout
    assert "[PASS] bandwidth: all-reduce" in out.stdout and "0 fail(s)" in out.stdout


def test_doctor_reports_planted_faults(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the checkpoint directory should be")
    env = _env()
    env.pop("GLOO_SOCKET_IFNAME", None)
    out = _doctor_torchrun(
        ["--cluster", "local", "--checkpoint-dir", str(blocker / "ck"),
         "--wandb-dir", str(tmp_path / "wb")],
        env,
    )  # fmt: skip
    assert out.returncode != 0, out.stdout
    assert "[FAIL] comm: rank(s) 0@" in out.stdout and "GLOO_SOCKET_IFNAME" in out.stdout
    assert "fix: export GLOO_SOCKET_IFNAME=lo" in out.stdout
    assert "[FAIL] checkpoint dir" in out.stdout and "not writable" in out.stdout
    assert "2 fail(s)" in out.stdout


def test_doctor_unknown_cluster(capsys):
    assert main(["--cluster", "nope"]) == 2
    assert "Known clusters" in capsys.readouterr().err


def test_doctor_checks_prepared_data_as_the_trainer_will(tmp_path, capsys, monkeypatch):
    from eurotrain.data.prepare import prepare

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("a document of the corpus " * 200)
    prepare(str(text), "byte", str(tmp_path / "prepared"), workers=1)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"base: {REPO / 'configs' / 'tiny.yaml'}\ndata:\n  sources: [{{path: {tmp_path / 'prepared'}}}]\n"
    )
    args = ["--cluster", "local", "--checkpoint-dir", str(tmp_path / "ck"),
            "--wandb-dir", str(tmp_path / "wb"), "--config", str(config)]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 0
    assert "[PASS] data: 1 prepared source(s)" in capsys.readouterr().out
    (tmp_path / "prepared" / "shard-00000.bin").write_bytes(b"\0\0")  # cut short
    assert main(args) != 0
    out = capsys.readouterr().out
    assert "[FAIL] data: data.sources: " in out and "shard-00000.bin has 2 bytes" in out


def test_doctor_warns_where_cpu_compiling_cannot_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    config = tmp_path / "run.yaml"
    config.write_text(f"base: {REPO / 'configs' / 'tiny.yaml'}\nparallel:\n  compile: true\n")
    args = ["--cluster", "local", "--checkpoint-dir", str(tmp_path / "ck"),
            "--wandb-dir", str(tmp_path / "wb"), "--config", str(config)]  # fmt: skip
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "a cache"))
    capsys.readouterr()
    main(args)
    out = capsys.readouterr().out
    assert "[WARN] compile: torch.compile on a CPU cannot work here" in out, out
    assert repr(str(tmp_path / "a cache")) in out
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    main(args)
    out = capsys.readouterr().out
    if inductor_cpu_problem() is None:  # this checkout's own environment has no spaced path
        assert "[PASS] compile: the paths in Inductor's C++ command are plain" in out, out
