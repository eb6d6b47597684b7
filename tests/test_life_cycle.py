"""The run life cycle on one process: the anomaly policy (skip, rollback, stop) and its skipped
data windows, the run identity check, the goodput ledger and `eurotrain status`, the
Young/Daly interval, what a failing run tells the job script, and straggler flagging (two real
gloo ranks). The job script's restart and chain paths: tests/launch/test_chain.py; everything
at once on the real SLURM: tests/launch/test_slurm_chaos.py."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from multiproc import REPO, read_metrics, run_distributed, small_run

from eurotrain import ConfigError, Trainer
from eurotrain.checkpoint.interval import AutoInterval, young_daly
from eurotrain.errors import CheckpointError, NonFiniteLossError
from eurotrain.fault.anomalies import WINDOWS_FILE, read_windows
from eurotrain.fault.inject import NAN_HOOK
from eurotrain.goodput import (
    CATEGORIES,
    FILE,
    LIVE,
    GoodputRecorder,
    Ledger,
    read_records,
    summarize,
)
from eurotrain.identity import check_run_dir
from eurotrain.status import main as status_main
from eurotrain.status import report

TINY = REPO / "configs/tiny.yaml"


def tiny(out: Path, *overrides: str):
    return small_run(out, "--train.steps", "8", *overrides)


def losses(run_dir: Path) -> dict[int, float]:
    """Each step's loss as metrics.jsonl keeps it (the last value of a step run twice)."""
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "step" in m}


# ---- anomalies -----------------------------------------------------------------------------
def test_a_poisoned_batch_is_skipped_stops_or_rolls_back_past_its_window(tmp_path, monkeypatch):
    """Batch 4 (step 5) has NaN gradients. skip: the update is skipped and the run goes on;
    stop: the run stops with an error naming the step; rollback: the run reloads step 4's
    checkpoint, records the window [4, 5) and trains on, and every step's loss then equals a
    run that skipped that window from the start (a resumed run honours the recorded window)."""
    monkeypatch.setenv(NAN_HOOK, "4")
    skip = Trainer(
        tiny(
            tmp_path / "skip", "--fault.anomaly_policy", "skip", "--train.max_nonfinite_steps", "1"
        )
    )
    result = skip.train()
    assert skip.state.nonfinite_steps == 1 and skip.state.step == 8
    assert math.isnan(result.grad_norms[4]) and all(math.isfinite(x) for x in result.losses)

    stop = Trainer(tiny(tmp_path / "stop", "--fault.anomaly_policy", "stop"))
    with pytest.raises(NonFiniteLossError, match=r"step 5: .* is not finite .*anomaly_policy stop"):
        stop.train()

    rolled = Trainer(
        tiny(tmp_path / "roll", "--fault.anomaly_policy", "rollback", "--checkpoint.interval", "2")
    )
    rolled.train()
    run_dir = tmp_path / "roll" / "run"
    [window] = read_windows(run_dir)
    assert (window["start"], window["end"], window["step"], window["rolled_back_to"]) == (
        4,
        5,
        5,
        4,
    )
    assert sorted(losses(run_dir)) == list(range(1, 9))
    records = read_records(run_dir)
    assert len(records) == 1 and records[0]["rollback_s"] > 0 and records[0]["how"] == "done"

    # A run that knows the window from the start (as a resumed run reads it) sees the same data.
    monkeypatch.delenv(NAN_HOOK)
    planted = tmp_path / "planted" / "run"
    planted.mkdir(parents=True)
    (planted / WINDOWS_FILE).write_text((run_dir / WINDOWS_FILE).read_text())
    Trainer(tiny(tmp_path / "planted", "--checkpoint.interval", "2")).train()
    assert losses(planted) == losses(run_dir)


def test_rollbacks_are_limited_and_need_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv(NAN_HOOK, "1")
    none = Trainer(tiny(tmp_path / "a", "--fault.anomaly_policy", "rollback"))
    with pytest.raises(NonFiniteLossError, match="no committed checkpoint from before step 2"):
        none.train()
    monkeypatch.setenv(NAN_HOOK, "2")
    limited = Trainer(
        tiny(tmp_path / "b", "--fault.anomaly_policy", "rollback", "--checkpoint.interval", "1",
             "--fault.max_rollbacks", "0")
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"0 rollbacks done already \(fault.max_rollb"):
        limited.train()


@pytest.mark.parametrize(
    "text, reason",
    [
        ('{"windows": [{"start": 5, "end": 2}]}', "bad window"),
        ('{"windows": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deep"),
    ],
)
def test_a_damaged_windows_file_is_an_error_naming_it(tmp_path, text, reason):
    (tmp_path / WINDOWS_FILE).write_text(text)
    with pytest.raises(CheckpointError, match=f"{WINDOWS_FILE}: unreadable list of skipped data"):
        read_windows(tmp_path)
    with pytest.raises(CheckpointError, match=reason):
        read_windows(tmp_path)


# ---- identity ------------------------------------------------------------------------------
def test_a_run_directory_of_another_config_is_refused(tmp_path):
    cfg = tiny(tmp_path)
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    # What may change on resume does not make another run.
    longer = tiny(tmp_path, "--train.steps", "50", "--checkpoint.interval", "7")
    assert check_run_dir(tmp_path, longer.to_dict(), allow_change=False) is None
    other = tiny(tmp_path, "--optim.lr", "1e-4")
    with pytest.raises(ConfigError, match=r"written by another run .*optim.lr: 0.003 -> 0.0001"):
        check_run_dir(tmp_path, other.to_dict(), allow_change=False)
    note = check_run_dir(tmp_path, other.to_dict(), allow_change=True)
    assert note and "allowed by config" in note

    # Through the trainer: refused before anything is built or overwritten.
    Trainer(tiny(tmp_path / "out", "--train.steps", "1")).train()
    with pytest.raises(ConfigError, match="was written by another run"):
        Trainer(tiny(tmp_path / "out", "--train.steps", "2", "--train.seed", "7"))


# ---- goodput and status --------------------------------------------------------------------
def test_goodput_records_add_up_and_status_shows_them(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(tiny(tmp_path).to_yaml())
    base = {f"{c}_s": 0.0 for c in CATEGORIES}

    def rec(job, requeue, start, end, productive, gap, gap_s=0.0, **extra):
        return {**base, "job": job, "requeue": requeue, "attempt": 0, "start": start, "end": end,
                "wall_s": end - start, "productive_s": productive, "gap": gap, "gap_s": gap_s,
                **extra}  # fmt: skip

    lines = [
        rec("1", 0, 0.0, 100.0, 90.0, "", startup_s=10.0),
        rec("1", 0, 110.0, 200.0, 80.0, "restart", 10.0, lost_s=10.0),
        rec("1", 1, 500.0, 600.0, 95.0, "queue", 300.0, checkpoint_s=5.0),
    ]
    (run_dir / FILE).write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"torn')
    s = summarize(read_records(run_dir))
    assert (s["jobs"], s["attempts"], s["queue_gap_s"], s["restart_gap_s"]) == (2, 3, 300, 10)
    assert s["allocated_s"] == 300 and s["ratio"] == pytest.approx(265 / 300)

    assert status_main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "jobs so far: 2 (3 starts of the ranks, 1 of them restarts inside a job)" in out
    assert "effective training time: 88.3%" in out and "restart gaps" in out
    with pytest.raises(ConfigError, match="not a run directory"):
        report(tmp_path / "nothing")


def test_a_killed_attempt_is_accounted_from_its_heartbeat(tmp_path, monkeypatch):
    """Rank 0 was killed after a commit at step 4 and two more steps: the next start writes the
    record it never wrote, with the steps after the checkpoint it resumes from as lost."""
    dead = GoodputRecorder(tmp_path, Ledger(), enabled=True)
    dead.start, dead.ready = time.time() - 20.0, time.time() - 18.0
    dead.productive, dead.commits = 6.0, [(4, 4.0)]
    dead._heartbeat()
    assert (tmp_path / LIVE).exists()

    class Resumed:
        class state:  # what on_train_start reads
            step = 4

    GoodputRecorder(tmp_path, Ledger(), enabled=True).on_train_start(Resumed)  # type: ignore[arg-type]
    [record] = read_records(tmp_path)
    assert record["how"] == "killed" and record["productive_s"] == 4.0 and record["lost_s"] == 2.0
    assert record["startup_s"] == pytest.approx(2.0, abs=0.01)
    assert record["wall_s"] == pytest.approx(20.0, abs=5.0)
    assert not (tmp_path / LIVE).exists()


def test_goodput_of_a_real_run_covers_its_wall_time(tmp_path):
    Trainer(tiny(tmp_path, "--checkpoint.interval", "4", "--train.steps", "4")).train()
    [r] = read_records(tmp_path / "run")
    assert r["how"] == "done" and r["steps"] == [1, 4]
    parts = sum(r[f"{c}_s"] for c in CATEGORIES)
    assert parts == pytest.approx(r["wall_s"], abs=0.01)
    assert r["productive_s"] > 0 and r["checkpoint_s"] > 0 and r["startup_s"] > 0


# ---- the checkpoint interval ---------------------------------------------------------------
def test_young_daly_interval():
    assert young_daly(10.0, 3600.0) == pytest.approx(math.sqrt(2 * 10 * 3600) - 10)
    assert young_daly(0.0, 3600.0) == 0.0 and young_daly(2000.0, 3600.0) == 3600.0
    auto = AutoInterval(mtbf_s=3600.0, max_steps=10_000)
    auto.start(0)
    assert auto.next_step == 10 and not auto.due(9) and auto.due(10)
    line = auto.measured(10, stall_s=10.0, step_s=1.0)
    assert auto.every == round(math.sqrt(2 * 10 * 3600) - 10) == 258 and auto.next_step == 268
    assert line and "every 258 steps" in line and "stall 10 s" in line and "MTBF 1 h" in line
    assert auto.measured(268, stall_s=10.0, step_s=1.0) is None  # unchanged: not logged again
    again = AutoInterval(mtbf_s=3600.0, max_steps=100)
    again.load_state_dict(auto.state_dict())
    again.start(300)
    assert again.next_step == 558
    capped = AutoInterval(mtbf_s=3600.0, max_steps=100)
    capped.measured(10, 10.0, 1.0)
    assert capped.every == 100


# ---- the job script hears of errors ------------------------------------------------------
def test_a_run_that_cannot_start_tells_the_job_script_not_to_retry(tmp_path, monkeypatch):
    from eurotrain.chain import STATE_ENV
    from eurotrain.train import main

    state = tmp_path / "job.state"
    monkeypatch.setenv(STATE_ENV, str(state))
    rc = main(
        [str(TINY), "--train.output_dir", str(tmp_path), "--data.corpus", str(tmp_path / "gone")]
    )
    assert rc == 2
    line = state.read_text().strip()
    assert line.startswith("error fatal ") and "gone" in line, line


# ---- stragglers ----------------------------------------------------------------------------
def _straggler_check(rank: int, world: int) -> list:
    from eurotrain.fault.stragglers import Stragglers, describe

    s = Stragglers(0.2, rank, world)
    s.nodes = ["nodeA", "nodeB"]
    s.busy, s.wait, s.steps = (0.5, 0.0, 2) if rank == 1 else (0.1, 0.2, 2)
    found = s.check()
    return [found, describe(found) if found else ""]


def test_the_slow_rank_is_named_with_its_host():
    results = run_distributed(_straggler_check, 2, timeout=120)
    for found, text in results:  # every rank sees the same list
        assert [(f["rank"], f["host"], f["compute_s"]) for f in found] == [(1, "nodeB", 0.25)]
        assert "straggler: rank 1 (host nodeB) 0.25 s" in text


# ---- the checkpoint writer survives the walltime warning ---------------------------------
def test_a_stop_signal_at_the_writer_processs_start_leaves_it_running():
    """srun passes the USR1 warning to every process of a rank, the checkpoint writer too; one
    arriving while the writer starts (the first save after a start) must not kill it."""
    import os
    import signal

    from eurotrain.checkpoint.writer import ProcessSink

    sinks = [ProcessSink() for _ in range(3)]
    try:
        for sink in sinks:  # at once: the writer is still starting up
            os.kill(sink._proc.pid, signal.SIGUSR1)
        time.sleep(1.0)
        assert [sink._proc.poll() for sink in sinks] == [None, None, None]
    finally:
        for sink in sinks:
            sink.close()


# ---- the goodput simulation ----------------------------------------------------------------
def test_goodput_simulation_ranks_the_policies(tmp_path, capsys, monkeypatch):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("goodput_bench", REPO / "benchmarks/goodput.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look themselves up
    spec.loader.exec_module(bench)
    assert bench.main(["--seeds", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["results"]
    assert out["restart+auto"]["ettr_mean"] > out["restart"]["ettr_mean"] > 0.9
    assert out["restart"]["calendar_mean"] > out["chain"]["calendar_mean"]
    assert out["chain"]["calendar_mean"] > out["manual"]["calendar_mean"]
    # A run's own measurements as inputs: the chaos test's kind of goodput.jsonl.
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("checkpoint:\n  interval: 2\n")
    base = {f"{c}_s": 0.0 for c in CATEGORIES} | {"gap_s": 1.0, "steps": [1, 4]}
    rows = [base | {"how": "killed", "startup_s": 5.0, "checkpoint_s": 0.4},
            base | {"how": "hang", "startup_s": 7.0, "resume_s": 0.5, "lost_s": 12.0},
            base | {"how": "done", "startup_s": 6.0, "resume_s": 0.3, "gap_s": 2.0}]  # fmt: skip
    (run / FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    measured = bench.from_run(bench.Inputs(), run)
    assert measured == {"startup_s": 6.0, "resume_s": 0.4, "stall_s": 0.2,
                        "crash_detect_s": 1.0, "hang_timeout_s": 14.0}  # fmt: skip


# ---- spikes, the watchdog's timeout, the auto interval in a run -------------------------------
def test_a_loss_spike_is_vetoed_and_left_out_of_the_statistics():
    import torch

    from eurotrain.fault.anomalies import SpikeDetector
    from eurotrain.fault.config import FaultConfig

    cfg = FaultConfig(spike_zscore=6.0, grad_spike_zscore=6.0, spike_window=4)
    detector = SpikeDetector(cfg, torch.device("cpu"))
    flags = []
    for loss, norm in [(3.0, 1.0), (2.9, 1.1), (3.1, 0.9), (3.0, 1.0), (2.95, 1.05)]:
        flags.append(bool(detector.veto(torch.tensor(loss), torch.tensor(norm))))
    before = detector.stats.clone()
    flags.append(bool(detector.veto(torch.tensor(9.0), torch.tensor(1.0))))  # a loss spike
    assert torch.equal(detector.stats, before)  # a vetoed step does not move the statistics
    flags.append(bool(detector.veto(torch.tensor(3.0), torch.tensor(50.0))))  # a norm spike
    flags.append(bool(detector.veto(torch.tensor(3.02), torch.tensor(1.0))))
    assert flags == [False] * 5 + [True, True, False]
    # Not finite: not a spike (the engine skips it anyway), and not counted either.
    assert not detector.veto(torch.tensor(float("nan")), torch.tensor(1.0))
    again = SpikeDetector(cfg, torch.device("cpu"))
    again.load_state_dict(detector.state_dict())
    assert torch.equal(again.stats, detector.stats)


def test_the_automatic_hang_timeout_follows_the_slowest_pause(tmp_path):
    from eurotrain.fault.config import FaultConfig
    from eurotrain.fault.watchdog import HangWatchdog

    cfg = FaultConfig(hang_min_s=2.0, hang_step_multiple=10.0, collective_timeout_s=30.0)
    dog = HangWatchdog(cfg, rank=0, world_size=1, run_dir=tmp_path)
    assert dog.timeout() == 30.0  # before the first step: the collective timeout
    dog.beat("after step", 1)
    dog.steps_seen = 1
    dog.last -= 0.5  # a pause of half a second between beats
    dog.beat("after step", 2)
    assert dog.timeout() == pytest.approx(5.0, abs=0.1)  # 10 x the longest pause
    assert HangWatchdog(FaultConfig(hang_timeout_s=7.0), 0, 1, tmp_path).timeout() == 7.0


def test_auto_interval_logs_its_choice_in_a_run(tmp_path, capsys):
    cfg = tiny(tmp_path, "--train.steps", "14", "--checkpoint.interval", "auto",
               "--fault.mtbf_hours", "0.001")  # fmt: skip
    Trainer(cfg).train()
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "checkpoint.interval auto: every" in x)
    assert (
        "Young/Daly" in line and "MTBF 0.001 h" in line and "(MTBF from fault.mtbf_hours)" in line
    )
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert steps[0] == "step-000010"  # the first save, then as measured
