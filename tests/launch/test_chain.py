"""The job script's restart and chain logic (eurotrain/chain.py), run by bash with stub srun and
scontrol: each srun call plays one start of the ranks (what they report to the job-state file,
what srun prints, the exit code), so every path runs in a second. The real SLURM runs it in
test_slurm_chaos.py."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from eurotrain.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
JOB_ID = 77


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def job(tmp_path):
    """bin/ with stubs: srun runs starts/N.sh on its N-th call (recording its argv); scontrol
    knows node1..node3 and records a requeue, then ends the script as SLURM would."""
    bin_dir, starts, rec = tmp_path / "bin", tmp_path / "starts", tmp_path / "rec"
    for d in (bin_dir, starts, rec, tmp_path / "work"):
        d.mkdir()
    q = shlex.quote
    _stub(
        bin_dir / "srun",
        f"n=$(($(cat {q(str(rec / 'count'))} 2>/dev/null || echo 0) + 1))\n"
        f"echo $n > {q(str(rec / 'count'))}\n"
        f'printf "%s\\n" "$@" > {q(str(rec))}/srun-$n\n'
        f"[ -f {q(str(starts))}/$n.sh ] || exit 99\n"
        f"exec bash {q(str(starts))}/$n.sh\n",
    )
    _stub(
        bin_dir / "scontrol",
        'case "$1 $2" in\n'
        '  "show hostnames") printf "node1\\nnode2\\nnode3\\n" | head -n "$NUM_NODES";;\n'
        '  "show node") echo "NodeName=$3 NodeAddr=127.0.0.1";;\n'
        f'  "requeue $SLURM_JOB_ID") echo requeued > {q(str(rec / "requeue"))}; kill -9 $PPID;;\n'
        "esac\n",
    )
    return tmp_path


def _script(monkeypatch, capsys, job: Path, *args: str, overrides: tuple[str, ...] = ()) -> str:
    monkeypatch.chdir(job / "work")
    rc = cli_main([
        "launch", "--cluster", "local", "--time", "00:10:00", "--dry-run", *args, TINY,
        "--checkpoint.interval", "5", *overrides,
    ])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def _run(job: Path, script: str, starts: list[str], nodes: int, restarts: int = 0):
    """Run the script with srun's N-th call playing starts[N-1] (bash; $EUROTRAIN_JOB_STATE is
    the job-state file). Returns (exit code, output, srun argv per call, requeued?)."""
    for i, body in enumerate(starts, 1):
        (job / "starts" / f"{i}.sh").write_text(body)
    (job / "job.sbatch").write_text(script)
    env = {
        "PATH": f"{job / 'bin'}:/usr/bin:/bin", "HOME": str(job), "SLURM_JOB_ID": str(JOB_ID),
        "SLURM_JOB_NODELIST": "node[1-3]", "SLURM_JOB_NUM_NODES": str(nodes),
        "NUM_NODES": str(nodes), "SLURM_RESTART_COUNT": str(restarts),
    }  # fmt: skip
    done = subprocess.run(
        ["bash", str(job / "job.sbatch")], cwd=job / "work", env=env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    calls = sorted((job / "rec").glob("srun-*"), key=lambda p: int(p.name.split("-")[1]))
    argv = [p.read_text().splitlines() for p in calls]
    return done.returncode, done.stdout + done.stderr, argv, (job / "rec" / "requeue").exists()


STATE = '>> "$EUROTRAIN_JOB_STATE"'


def test_failed_ranks_restart_without_the_failing_node(job, monkeypatch, capsys):
    script = _script(monkeypatch, capsys, job, "--nodes", "1", "--spare-nodes", "1")
    crash = 'echo "srun: error: node1: task 1: Killed" >&2; exit 137\n'
    finish = f'echo "checkpoint 10" {STATE}; echo "done 10" {STATE}\n'
    rc, out, argv, requeued = _run(job, script, [crash, finish], nodes=2)
    assert rc == 0 and not requeued, out
    assert "--nodelist=node1" in argv[0] and "--nodelist=node2" in argv[1], argv
    assert "--ntasks=2" in argv[1]
    assert "the ranks failed (exit 137) on node(s) node1: restart 1 of 3" in out
    assert "without node1" in out and "the run reached train.steps" in out
    assert "ends at " in out


def test_the_nodes_the_ranks_name_win_over_srun_and_spares_are_never_exceeded(
    job, monkeypatch, capsys
):
    script = _script(monkeypatch, capsys, job, "--nodes", "1", "--spare-nodes", "1")
    hang = f'echo "suspect node1" {STATE}; echo "srun: error: node3: task 0: Exited" >&2; exit 3\n'
    again = f'echo "suspect node2" {STATE}; exit 3\n'
    finish = f'echo "done 10" {STATE}\n'
    rc, out, argv, _ = _run(job, script, [hang, again, finish], nodes=2)
    assert rc == 0, out
    # One spare: node1 is left out, then node2 (and node1 is back).
    assert [a[a.index("--nodes=1") + 2] for a in argv] == [
        "--nodelist=node1", "--nodelist=node2", "--nodelist=node1",
    ]  # fmt: skip


def test_an_error_a_restart_would_repeat_ends_the_job_and_the_chain(job, monkeypatch, capsys):
    script = _script(monkeypatch, capsys, job, "--nodes", "1", "--chain", "3")
    config_error = f'echo "error fatal configuration error: data.corpus: gone" {STATE}; exit 2\n'
    rc, out, argv, requeued = _run(job, script, [config_error], nodes=1)
    assert rc == 2 and len(argv) == 1 and not requeued, out
    assert "an error a restart would repeat (above): no restart, no requeue" in out
    # A diverged run exits 1, but says it is fatal: the same.
    for f in (job / "rec").glob("*"):
        f.unlink()
    diverged = f'echo "error fatal training stopped: step 9: loss nan" {STATE}; exit 1\n'
    rc, out, argv, requeued = _run(job, script, [diverged], nodes=1)
    assert rc == 1 and len(argv) == 1 and not requeued, out


def test_the_walltime_warning_requeues_a_chain_until_it_is_used_up(job, monkeypatch, capsys):
    script = _script(monkeypatch, capsys, job, "--nodes", "1", "--chain", "3")
    stopped = f'echo "checkpoint 5" {STATE}; echo "stopped 5" {STATE}\n'
    rc, out, _, requeued = _run(job, script, [stopped], nodes=1, restarts=1)
    assert requeued and "requeueing the job" in out, out
    os.unlink(job / "rec" / "requeue")
    (job / "rec" / "count").unlink()
    rc, out, _, requeued = _run(job, script, [stopped], nodes=1, restarts=2)  # job 3 of 3
    assert rc == 0 and not requeued and "job 3 of a chain of 3: submit again" in out, out


def test_a_chain_never_requeues_a_job_without_a_checkpoint(job, monkeypatch, capsys):
    script = _script(monkeypatch, capsys, job, "--nodes", "1", "--until-done")
    assert "#SBATCH --requeue" in script and "#SBATCH --open-mode=append" in script
    stopped = f'echo "stopped 0" {STATE}\n'
    rc, out, _, requeued = _run(job, script, [stopped], nodes=1, restarts=40)
    assert rc == 1 and not requeued, out
    assert "committed no checkpoint: the chain ends" in out


def test_restarts_are_limited_then_the_chain_goes_on(job, monkeypatch, capsys):
    script = _script(
        monkeypatch, capsys, job, "--nodes", "1", "--chain", "2",
        overrides=("--fault.max_restarts", "1"),
    )  # fmt: skip
    crash = f'echo "checkpoint 5" {STATE}; exit 1\n'
    _, out, argv, requeued = _run(job, script, [crash, crash], nodes=1)
    assert len(argv) == 2 and requeued, out
    assert "failed (exit 1) 2 times in this job: requeueing" in out


def test_a_chain_needs_checkpoints(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    rc = cli_main(["launch", "--cluster", "local", "--nodes", "1", "--time", "00:10:00",
                   "--chain", "3", "--dry-run", TINY])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "saves no checkpoints (checkpoint.interval 0)" in err, err


def test_a_chain_whose_collective_timeout_outlasts_the_walltime_warning_is_noted(
    monkeypatch, capsys, tmp_path
):
    monkeypatch.chdir(tmp_path)
    args = ["launch", "--cluster", "local", "--nodes", "1", "--time", "00:30:00", "--chain", "3",
            "--dry-run", TINY, "--checkpoint.interval", "5"]  # fmt: skip
    assert cli_main(args) == 0
    assert "note:" not in capsys.readouterr().err  # the defaults: 240 s < 300 s
    assert cli_main([*args, "--fault.collective_timeout_s", "600"]) == 0
    err = capsys.readouterr().err
    assert "note: fault.collective_timeout_s 600 s is not shorter than --signal-seconds 300" in err
    assert cli_main([*args, "--fault.collective_timeout_s", "120"]) == 0
    assert "note:" not in capsys.readouterr().err


@pytest.mark.parametrize("value, expected", [("3", 3), ("", 0), ("²", 0), ("-1", 0), ("x", 0)])
def test_an_attempt_number_that_is_not_a_count_reads_as_the_first(monkeypatch, value, expected):
    from eurotrain import chain

    monkeypatch.setenv(chain.ATTEMPT_ENV, value)
    assert chain.attempt() == expected
