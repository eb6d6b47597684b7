"""Chaos on the real two-node SLURM (launch/testing/slurm_local.sh): one run of an
`eurotrain launch --chain` job meets a SIGKILLed rank, a SIGSTOPped (hung) rank, a poisoned
batch and walltime warnings until it needed three jobs, and finishes on its own; its losses equal
an uninterrupted run's that skips the same data window, the hung rank's stacks are in the run
directory, and goodput.jsonl accounts for every job.

The walltime warning is SLURM's own (`scancel --batch --signal=USR1`, what `--signal=B:USR1@S`
sends S seconds before the walltime), sent by the test when the run is past a step: SLURM checks
walltimes only every half minute, and a real walltime of one minute per job would make this
test minutes long. SLURM holds a requeued job for two minutes before it may start again; the
test lets it start 3 s later (`scontrol update StartTime=now`), as if the queue were short."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from multiproc import read_metrics

from eurotrain import Trainer, load_config
from eurotrain.fault.anomalies import WINDOWS_FILE
from eurotrain.goodput import CATEGORIES, read_records

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
STEPS = 30
RUN = (
    "--model.num_layers", "2", "--model.dim", "64", "--model.ffn_dim", "128",
    "--data.seq_len", "32", "--train.global_batch_size", "4", "--train.micro_batch_size", "2",
    "--train.steps", str(STEPS), "--logging.log_interval", "1", "--checkpoint.interval", "2",
    "--checkpoint.async_save", "false", "--fault.anomaly_policy", "rollback",
    "--fault.hang_timeout_s", "6", "--fault.collective_timeout_s", "30",
)  # fmt: skip


def _squeue(slurm: dict[str, str], job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=slurm,
                         capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip()


FINAL = ("the job (and its chain) ends", "no restart, no requeue", "the chain ends", "submit again")
"""What the job script says when the chain ends (eurotrain/chain.py)."""


def _slurm(slurm: dict[str, str], *cmd: str) -> None:
    subprocess.run(cmd, env=slurm, capture_output=True, timeout=30)


def _logs(tmp_path: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*.out"))


def _steps(run_dir: Path) -> int:
    try:
        return max((m.get("step", 0) for m in read_metrics(run_dir)), default=0)
    except (OSError, ValueError):
        return 0


def test_a_chain_survives_kills_hangs_nan_and_walltimes(slurm, tmp_path):
    run_dir = tmp_path / "runs" / "chaos"
    env = {
        **slurm,
        # Each fires once, in order, over the whole chain (markers in ONCE_DIR): rank 0 (which
        # holds the store) is killed after its 3rd step, then after the restart rank 1 freezes
        # after its 4th (a step rank 1 cannot finish in the first start, so the two never fire
        # in the same one): rank 0's watchdog holds the roll call and wakes it for its stacks.
        "EUROTRAIN_TEST_FREEZE": "0:+3:KILL,1:+4:STOP",
        "EUROTRAIN_TEST_ONCE_DIR": str(tmp_path),
        "EUROTRAIN_TEST_NAN_BATCH": "12",
        "EUROTRAIN_TEST_SLOW": "1:0.15",  # rank 1 (node2) a straggler: 0.15 s more per step
    }
    cmd = [
        sys.executable, "-m", "eurotrain", "launch", "--cluster", "local", "--nodes", "2",
        "--gpus-per-node", "1", "--time", "00:10:00", "--chain", "5",
        "--log-dir", str(tmp_path / "logs"), str(TINY), *RUN,
        "--train.output_dir", str(tmp_path / "runs"), "--train.run_name", "chaos",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    job = re.search(r"submitted job (\d+)", out.stdout)
    assert out.returncode == 0 and job, out.stdout + out.stderr
    job_id = job.group(1)

    # Walltime warnings: at step 16 of the first job (after the kill, the hang and the
    # rollback), then at step 22 of the second. SLURM holds a requeued job for two minutes (its
    # BeginTime); the test lets it start after 3 s, as a short queue would. Not at once: the
    # node's slurmd revoked the job's credential when its last run was killed and refuses a new
    # one created in the same second ("Job credential revoked", and the job ends, seen on a
    # loaded machine); 3 s later the new credential is younger than the revocation.
    deadline = time.monotonic() + 300
    warn_at = [16, 22]
    pending_since = None
    while time.monotonic() < deadline:
        log = _logs(tmp_path)
        if any(end in log for end in FINAL):
            break
        state = _squeue(slurm, job_id)  # (squeue may answer nothing for a moment: not an end)
        if state != "PENDING":
            pending_since = None
        if state == "PENDING" and "requeueing the job" in log:
            pending_since = pending_since or time.monotonic()
            if time.monotonic() - pending_since > 3:
                _slurm(slurm, "scontrol", "update", f"JobId={job_id}", "StartTime=now")
                pending_since = None
        elif (
            warn_at and state == "RUNNING" and _steps(run_dir) >= warn_at[0]
            and f"(requeue {2 - len(warn_at)}) starts at" in log
        ):  # fmt: skip
            _slurm(slurm, "scancel", "--batch", "--signal=USR1", job_id)
            warn_at.pop(0)
        time.sleep(0.3)
    while _squeue(slurm, job_id) and time.monotonic() < deadline:
        time.sleep(0.3)
    logs = _logs(tmp_path)
    assert not _squeue(slurm, job_id), f"still queued or running\n{logs[-6000:]}"
    assert "the run reached train.steps: the job (and its chain) ends" in logs, logs[-6000:]

    # Every step, each once, and a kill, a hang and three jobs on the way.
    metrics = read_metrics(run_dir)
    losses = {m["step"]: m["loss"] for m in metrics if "step" in m}
    assert sorted(losses) == list(range(1, STEPS + 1)), sorted(losses)
    assert "the ranks failed (exit" in logs and "restart 1 of 3" in logs, logs[-6000:]
    assert "restart 2 of 3" in logs, logs[-6000:]
    assert logs.count("requeueing the job") == 2, logs[-6000:]

    # The straggler, named with its host at log steps in metrics.jsonl and the log.
    flagged = [m["stragglers"] for m in metrics if "stragglers" in m]
    slow = [f for f in flagged if [(s["rank"], s["host"]) for s in f] == [(1, "node2")]]
    assert len(slow) >= 15, flagged  # of 30 steps (a loaded machine may hide a few)
    assert "straggler: rank 1 (host node2)" in logs, logs[-3000:]

    # The hung rank's stacks (and the others') are in the run directory.
    [hang] = (run_dir / "hangs").iterdir()
    frozen = (hang / "rank-00001.txt").read_text()
    assert "rank 1 on node2: frozen (it did not answer); woken with SIGCONT" in frozen, frozen
    assert "freeze_for_test" in frozen, frozen  # where it stood when it froze
    assert "no progress for" in (hang / "rank-00000.txt").read_text()
    assert json.loads((hang / "hang.json").read_text())["silent"] == [1]
    assert "rank 1 (host node2) stopped answering (frozen or dead)" in logs, logs[-6000:]

    # goodput.jsonl: one record per start of the ranks, over three jobs; each record's parts add
    # up to its wall time, and the records with the restart gaps between them cover each job
    # from its start to its end as the job script saw them.
    records = read_records(run_dir)
    assert [(r["requeue"], r["attempt"]) for r in records] == [
        (0, 0), (0, 1), (0, 2), (1, 0), (2, 0)
    ], records  # fmt: skip
    assert [r["how"] for r in records] == ["killed", "hang", "stopped", "stopped", "done"]
    for r in records:
        assert sum(r[f"{c}_s"] for c in CATEGORIES) == _approx(r["wall_s"]), r
    # The hang: the time stuck is lost; the rollback: the reload, and the step computed again.
    assert records[1]["lost_s"] >= 6 and records[2]["rollback_s"] > 0 and records[2]["lost_s"] > 0
    starts = [float(x) for x in re.findall(r"starts at (\d+\.\d+)", logs)]
    ends = [float(x) for x in re.findall(r"ends at (\d+\.\d+)", logs)]
    assert len(starts) == len(ends) == 3, logs[-3000:]
    for requeue, (start, end) in enumerate(zip(starts, ends)):
        job = [r for r in records if r["requeue"] == requeue]
        assert job[0]["start"] == _approx(start), (job[0], start)
        assert 0 <= end - job[-1]["end"] < 10, (job[-1], end)  # the script's own last seconds
        covered = sum(r["wall_s"] for r in job) + sum(r["gap_s"] for r in job[1:])
        assert covered == _approx(job[-1]["end"] - job[0]["start"]), job
        assert all(r["gap"] == "restart" for r in job[1:]), job
    assert [r["gap"] for r in records if r["attempt"] == 0] == ["", "queue", "queue"]

    # The losses equal an uninterrupted run's that skips the same data window.
    windows = json.loads((run_dir / WINDOWS_FILE).read_text())["windows"]
    assert len(windows) == 1 and windows[0]["start"] <= 12 < windows[0]["end"], windows
    ref_dir = tmp_path / "ref" / "run"
    ref_dir.mkdir(parents=True)
    (ref_dir / WINDOWS_FILE).write_text((run_dir / WINDOWS_FILE).read_text())
    ref_args = [*RUN, "--train.output_dir", str(tmp_path / "ref"), "--train.run_name", "run"]
    ref = Trainer(load_config(TINY, [*ref_args, "--train.device", "cpu"])).train()
    for step, loss in enumerate(ref.losses, 1):
        assert abs(losses[step] - loss) <= 1e-5 * abs(loss), (step, losses[step], loss)
    status = subprocess.run(
        [sys.executable, "-m", "eurotrain", "status", str(run_dir)], env=slurm,
        capture_output=True, text=True,
    )  # fmt: skip
    assert (
        f"step {STEPS} of {STEPS}" in status.stdout and "effective training time" in status.stdout
    )


class _approx(float):
    def __eq__(self, other: object) -> bool:
        return isinstance(other, (int, float)) and abs(float(other) - self) <= 0.05


def test_a_restart_leaves_the_failing_node_out_when_a_spare_node_exists(slurm, tmp_path):
    """One node for the ranks and one spare: a rank killed on node1 restarts them on node2."""
    env = {**slurm, "EUROTRAIN_TEST_FREEZE": "1:+3:KILL", "EUROTRAIN_TEST_ONCE_DIR": str(tmp_path)}
    cmd = [
        sys.executable, "-m", "eurotrain", "launch", "--cluster", "local", "--nodes", "1",
        "--spare-nodes", "1", "--gpus-per-node", "2", "--time", "00:10:00",
        "--log-dir", str(tmp_path / "logs"), str(TINY), *RUN, "--train.steps", "6",
        "--train.output_dir", str(tmp_path / "runs"), "--train.run_name", "spare",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    job = re.search(r"submitted job (\d+)", out.stdout)
    assert out.returncode == 0 and job, out.stdout + out.stderr
    deadline = time.monotonic() + 180  # (sbatch --wait polls far less often than this)
    while not any(end in _logs(tmp_path) for end in FINAL) and time.monotonic() < deadline:
        time.sleep(0.3)
    logs = _logs(tmp_path)
    assert "start 0 on node1;" in logs and "start 1 on node2;" in logs, logs[-4000:]
    assert "restart 1 of 3 from the last checkpoint, without node1" in logs, logs[-4000:]
    assert "the run reached train.steps" in logs
    steps = [m["step"] for m in read_metrics(tmp_path / "runs" / "spare") if "step" in m]
    assert sorted(set(steps)) == list(range(1, 7)), steps
