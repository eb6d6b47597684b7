"""Errors at run time reach the user as one line (rank 0 only, or each rank that saw its own),
with a non-zero exit code and no traceback: bad run directories, a full disk, a diverged run,
a rank that hangs or dies. Every case runs the real command line in real processes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from multiproc import REPO, free_port, run_torchrun

TINY = str(REPO / "configs/tiny.yaml")
LIGHT = ["--data.demo_bytes", "200000", "--data.seq_len", "64", "--train.global_batch_size", "4",
         "--train.micro_batch_size", "2"]  # fmt: skip
"""Less data and smaller steps than tiny.yaml's: these tests are about processes, not numbers."""


def error_lines(stderr: str) -> list[str]:
    """The lines eurotrain itself printed ("eurotrain: ...", "eurotrain data prepare: ..."), not
    warnings of libraries or torchrun's report."""
    return [line for line in stderr.splitlines() if re.match(r"eurotrain( [a-z]+)*: ", line)]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "eurotrain", *args], capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300,
    )  # fmt: skip


def start_ranks(nproc: int, args: list[str], env: dict[str, str] | None = None) -> list:
    """Each rank as its own ``python -m eurotrain.train`` process (RANK/WORLD_SIZE set, as srun
    or torchrun would), so that each rank's stderr can be read on its own."""
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        rank_env = {
            **os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RANK": str(rank),
            "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port, **(env or {}),
        }  # fmt: skip
        cmd = [sys.executable, "-m", "eurotrain.train", *args]
        pipe = subprocess.PIPE
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=rank_env, stdout=pipe, stderr=pipe, text=True)
        )
    return procs


def finish(procs: list, timeout: float = 300) -> list[tuple[int, str]]:
    """(exit code, stderr) of every rank; kills what is left after ``timeout``."""
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            err += "\n[killed by the test: no exit within the timeout]"
        out.append((p.returncode, err))
    return out


def test_output_dir_that_is_a_file_is_one_line_on_rank_0_only(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    args = [TINY, "--train.steps", "2", "--train.output_dir", str(afile)]
    one = run_cli("train", *args)
    assert one.returncode == 2 and "Traceback" not in one.stderr, one.stderr[-3000:]
    assert error_lines(one.stderr) == [
        f"eurotrain: configuration error: train.output_dir: {str(afile)!r} is a file, not "
        f"a directory; choose another train.output_dir"
    ]
    (rc0, err0), (rc1, err1) = finish(start_ranks(2, args), timeout=240)
    assert rc0 == 2 and rc1 == 2, (err0[-2000:], err1[-2000:])
    assert "Traceback" not in err0 + err1, (err0[-3000:], err1[-3000:])
    assert len(error_lines(err0)) == 1 and "is a file, not a directory" in err0
    assert error_lines(err1) == []


def test_base_cycle_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    proc = run_cli("train", str(tmp_path / "a.yaml"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    assert "include each other through 'base:'" in line and "a.yaml -> " in line


def test_full_disk_while_checkpointing_is_one_line_from_the_cli(tmp_path: Path) -> None:
    proc = run_cli("train", TINY, "--train.steps", "4", "--checkpoint.interval", "2",
                   "--train.output_dir", str(tmp_path), "--train.run_name", "full",
                   env={"EUROTRAIN_TEST_CKPT_ENOSPC": "2"})  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    cli = [ln for ln in error_lines(proc.stderr) if ln.startswith("eurotrain: checkpoint error:")]
    assert len(cli) == 1 and "checkpoint step 2 could not be written" in cli[0]
    assert "No space left on device" in cli[0]


def test_diverged_run_is_one_line_from_the_cli(tmp_path: Path) -> None:
    # lr 1e30: the first update sends every weight to ~1e30; the second step's loss is not finite.
    args = [TINY, "--train.steps", "5", "--optim.lr", "1e30", "--schedule.warmup_steps", "0",
            "--train.output_dir", str(tmp_path)]  # fmt: skip
    proc = run_cli("train", *args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    assert line.startswith("eurotrain: training stopped: step ") and "not finite" in line
    torchrun = run_torchrun(2, [*args, "--train.run_name", "two"])
    assert torchrun.returncode != 0
    # torchrun adds a report (with a traceback) of its own after a rank fails; the ranks' own
    # output holds one line and no traceback ([rankN]: prefixes mark a rank's traceback).
    assert len(error_lines(torchrun.stderr)) == 1, torchrun.stderr[-3000:]
    assert "]: Traceback" not in torchrun.stderr, torchrun.stderr[-3000:]


def test_a_hung_rank_is_named_with_its_host_by_the_rank_still_running(tmp_path: Path) -> None:
    """Rank 1 freezes (SIGSTOP) after step 2; rank 0's next all-reduce times out after 5 s and
    rank 0 names rank 1 and its host, then exits; the test then kills the frozen rank."""
    args = [TINY, *LIGHT, "--train.steps", "200", "--train.output_dir", str(tmp_path),
            "--fault.collective_timeout_s", "5"]  # fmt: skip
    procs = start_ranks(2, args, env={"EUROTRAIN_TEST_FREEZE": "1:2:STOP"})
    try:
        ((rc0, err0),) = finish(procs[:1], timeout=240)
    finally:
        procs[1].send_signal(signal.SIGKILL)
        finish(procs[1:])
    assert rc0 == 1 and "Traceback" not in err0, err0[-3000:]
    (line,) = error_lines(err0)
    host = socket.gethostname()
    assert line.startswith("eurotrain: collective failed: a collective timed out after 5 s in "
                           "step 3: rank 1 (host "), line  # fmt: skip
    assert f"rank 1 (host {host}) stopped answering; rank 0 (host {host}) was waiting" in line


def test_a_killed_rank_is_named_with_its_host_by_the_rank_still_running(tmp_path: Path) -> None:
    args = [TINY, *LIGHT, "--train.steps", "200", "--train.output_dir", str(tmp_path),
            "--fault.collective_timeout_s", "60"]  # fmt: skip
    (rc0, err0), (rc1, _) = finish(
        start_ranks(2, args, env={"EUROTRAIN_TEST_FREEZE": "1:2:KILL"}), timeout=240
    )
    assert rc1 == -signal.SIGKILL
    assert rc0 == 1 and "Traceback" not in err0, err0[-3000:]
    (line,) = error_lines(err0)
    host = socket.gethostname()
    assert "a collective lost a peer in step 3" in line, line
    assert f"rank 1 (host {host}) stopped answering" in line


def test_a_rank_stuck_outside_collectives_still_answers_the_roll_call(tmp_path: Path) -> None:
    """Rank 1's main thread sleeps after step 2 (no collective, process alive): its watch
    thread answers rank 0's roll call, so rank 0 does not call it gone."""
    args = [TINY, *LIGHT, "--train.steps", "200", "--train.output_dir", str(tmp_path),
            "--fault.collective_timeout_s", "5"]  # fmt: skip
    procs = start_ranks(2, args, env={"EUROTRAIN_TEST_FREEZE": "1:2:SLEEP"})
    try:
        ((rc0, err0),) = finish(procs[:1], timeout=240)
    finally:
        procs[1].send_signal(signal.SIGKILL)
        finish(procs[1:])
    assert rc0 == 1 and "Traceback" not in err0, err0[-3000:]
    (line,) = error_lines(err0)
    assert "a collective timed out after 5 s in step 3, yet all 2 ranks are still running" in line
    assert "stopped answering" not in line


def test_rank_lists_stay_short_and_name_hosts() -> None:
    from eurotrain.fault import _ranks, is_collective_failure

    hosts = {r: f"node{r // 4}" for r in range(12)}
    assert _ranks([5], hosts) == "rank 5 (host node1)"
    assert _ranks([0, 1], {}) == "ranks 0 (host unknown), 1 (host unknown)"
    many = _ranks(list(range(12)), hosts)
    assert many.startswith("ranks 0 (node0), 1 (node0),") and many.endswith("and 4 more")
    assert is_collective_failure(RuntimeError("[gloo/pair.cc:537] Connection reset by peer"))
    assert not is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_a_launch_that_cannot_work_is_one_line() -> None:
    proc = run_cli("train", TINY, "--train.device", "cuda", env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    assert "train.device is 'cuda' but no GPU is visible" in line
