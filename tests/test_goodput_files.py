"""The files a run reads back about itself (the goodput heartbeat and records, metrics.jsonl),
damaged on disk: a restart sets a bad heartbeat aside and trains on, a resume drops bad metrics
lines with a warning, and `eurotrain status` skips and counts bad records instead of failing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from multiproc import small_run

from eurotrain import Trainer
from eurotrain.goodput import (
    ATTEMPT_START_ENV,
    CATEGORIES,
    FILE,
    LIVE,
    GoodputRecorder,
    Ledger,
    read_records,
)
from eurotrain.status import main as status_main
from eurotrain.status import report

DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON that no recursive parser can read


def tiny(out: Path, steps: int):
    return small_run(out, "--checkpoint.interval", "2", "--train.steps", str(steps))


def good_record(**fields) -> dict:
    base = {f"{c}_s": 0.0 for c in CATEGORIES}
    return {**base, "job": "7", "requeue": 0, "attempt": 0, "start": 100.0, "end": 200.0,
            "wall_s": 100.0, "productive_s": 90.0, "steps": [1, 4], "how": "done",
            "gap_s": 0.0, "gap": "", **fields}  # fmt: skip


class Resumed:
    class state:  # what on_train_start reads: the step of the checkpoint resumed from
        step = 4


def test_a_resume_survives_a_bad_heartbeat_and_a_deep_metrics_line(tmp_path, capfd):
    """After the checkpoint is loaded, a heartbeat whose commits are not [step, seconds] pairs
    and a metrics.jsonl line nested 100,000 deep used to end the restart with a traceback (and
    every restart after it). Now both are warned about and the run trains to its end."""
    Trainer(tiny(tmp_path, 2)).train()
    run_dir = tmp_path / "run"
    (run_dir / LIVE).write_text(json.dumps({"wall_s": 5.0, "productive_s": 5.0, "commits": [[1]]}))
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(DEEP + "\n")
    capfd.readouterr()

    result = Trainer(tiny(tmp_path, 4)).train()
    out, err = capfd.readouterr()
    assert len(result.losses) == 2 and not result.stopped_early  # steps 3 and 4
    assert f"warning: {run_dir / LIVE}: commits is [[1]], not a list of [step, " in err
    assert "the previous attempt's goodput record is lost, training goes on" in err
    assert f"warning: {run_dir / 'metrics.jsonl'}: dropped 1 line(s) that are not JSON" in out
    assert not (run_dir / LIVE).exists()
    assert json.loads((run_dir / (LIVE + ".bad")).read_text())["commits"] == [[1]]
    assert [r["how"] for r in read_records(run_dir)] == ["done", "done"]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("live", "problem"),
    [
        ({"commits": [[1]]}, "commits is [[1]], not a list of [step, productive seconds]"),
        ({"commits": [[1, "x"]]}, "commits is [[1, 'x']], not a list of [step, productive"),
        ({"commits": 7}, "commits is 7, not a list"),
        ({"lost_s": "a"}, "lost_s is 'a', not a duration in seconds"),
        ({"lost_s": -1.0}, "lost_s is -1.0, not a duration"),
        ({"wall_s": None}, "wall_s is None, not a duration"),
        ({"productive_s": 1e400}, "productive_s is inf, not a duration"),
        ({"end": "yesterday"}, "end is 'yesterday', not a Unix time"),
        ({"job": [1]}, "job is [1], not a string"),
        ({"requeue": True}, "requeue is True, not a count"),
        ({"steps": [1]}, "steps is [1], not [first, last]"),
        ('{"wall_s": 20.0}', "productive_s is None, not a duration"),  # an older schema
        ("[1, 2]", "not a JSON object but list"),
        (DEEP, "unreadable (nested too deeply)"),
        ("{torn", "unreadable (Expecting property name"),
    ],
)
def test_a_bad_heartbeat_is_set_aside_with_one_warning(tmp_path, capsys, live, problem):
    """Each of these used to fail every restart of the run (ValueError, TypeError) after its
    checkpoint was loaded; now one warning, the file moved to .bad, and on_train_start returns."""
    text = live if isinstance(live, str) else json.dumps({**good_record(), **live})
    (tmp_path / LIVE).write_text(text)
    GoodputRecorder(tmp_path, Ledger(), enabled=True).on_train_start(Resumed)  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and f"{tmp_path / LIVE}: {problem}" in err
    assert f"moved to {LIVE}.bad" in err
    assert (tmp_path / (LIVE + ".bad")).read_text() == text
    assert not (tmp_path / LIVE).exists() and read_records(tmp_path) == []


def test_a_good_heartbeat_becomes_a_clean_record(tmp_path, capsys):
    """Unknown keys stay out of the record; commits up to the resumed step are kept."""
    live = good_record(how="killed", productive_s=6.0, lost_s=1.0, commits=[[2, 2.0], [4, 4.5]],
                       junk={"x": 1})  # fmt: skip
    (tmp_path / LIVE).write_text(json.dumps(live))
    GoodputRecorder(tmp_path, Ledger(), enabled=True).on_train_start(Resumed)  # type: ignore[arg-type]
    assert capsys.readouterr().err == ""
    [r] = read_records(tmp_path)
    assert r["productive_s"] == 4.5 and r["lost_s"] == 2.5 and r["how"] == "killed"
    assert "junk" not in r and "commits" not in r and not (tmp_path / LIVE).exists()


def test_status_skips_and_counts_bad_goodput_records(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(tiny(tmp_path, 8).to_yaml())
    bad = [
        {"wall_s": 1, "productive_s": "x"},
        {"wall_s": 1, "job": [1], "requeue": 0},
        {"wall_s": 1, "gap": "queue", "gap_s": None},
        {"wall_s": 1e400},
        {"wall_s": 1e300},
        {"wall_s": True},
    ]
    lines = [json.dumps(good_record())] + [json.dumps(r) for r in bad] + [DEEP, '{"torn']
    (run_dir / FILE).write_text("\n".join(lines) + "\n")
    (run_dir / "metrics.jsonl").write_text(
        '{"step": 3}\n' + DEEP + '\n{"step": "9"}\n{"step": true}\n[]\n'
    )

    assert status_main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "step 3 of 8" in out
    assert "goodput.jsonl: 8 line(s) skipped (torn by a kill, or malformed)" in out
    assert "jobs so far: 1 (1 starts of the ranks" in out
    assert "effective training time: 90.0%" in out
    info = report(run_dir)
    assert info["goodput"]["skipped"] == 8 and info["goodput"]["attempts"] == 1
    assert status_main([str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["goodput"]["skipped"] == 8


@pytest.mark.parametrize(
    ("live", "problem"),
    [
        ('{"end": "yesterday", "job": "1", "wall_s": 1, "productive_s": 1}', "end is 'yesterday'"),
        ("[]", "not a JSON object but list"),
        (DEEP, "unreadable (nested too deeply)"),
    ],
)
def test_status_names_a_bad_heartbeat_instead_of_failing(tmp_path, capsys, live, problem):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(tiny(tmp_path, 8).to_yaml())
    (run_dir / LIVE).write_text(live)
    assert status_main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"heartbeat {LIVE}: {problem}" in out and "running or died" not in out
    assert report(run_dir)["running"] is None


def test_status_shows_a_good_heartbeat(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(tiny(tmp_path, 8).to_yaml())
    (run_dir / LIVE).write_text(json.dumps(good_record(end=time.time() - 30, commits=[])))
    assert status_main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "running or died without a record: job 7 (requeue 0, start 0)" in out
    assert "heartbeat" in out and "skipped" not in out


@pytest.mark.parametrize("value", ["nan", "inf", "soon"])
def test_an_attempt_start_that_is_not_a_time_is_ignored(tmp_path, monkeypatch, value):
    """The job script's start time comes through the environment; one that is not a finite
    number falls back to the process start, so the record still passes its own check."""
    monkeypatch.setenv(ATTEMPT_START_ENV, value)
    recorder = GoodputRecorder(tmp_path, Ledger(), enabled=True)
    assert time.time() - 3600 < recorder.start <= time.time()
    recorder.finish("done")
    [record] = read_records(tmp_path)
    assert record["how"] == "done" and record["wall_s"] >= 0
