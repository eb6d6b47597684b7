"""bench.json read back by `eurotrain bench report` and `eurotrain plan --calibrate`: a damaged
or hand-edited file is refused with one line naming the file, the record and the field (it used
to be an AttributeError or KeyError); a record lacking an optional measurement shows "-"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eurotrain.bench.report import write_report
from eurotrain.bench.results import FILE, FORMAT, read_results
from eurotrain.bench.sweep import _read_record, summary
from eurotrain.errors import ConfigError
from eurotrain.plan.cli import main as plan_main

REPO = Path(__file__).resolve().parents[1]
DEEP = "[" * 100_000 + "]" * 100_000


def bench_file(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / FILE).write_text(text)
    return directory


def result(**fields) -> str:
    return json.dumps({"format": FORMAT, "cluster": "local", **fields})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", r"not an eurotrain-bench/1 result \(a JSON list, not an object\)"),
        (DEEP, r"not a readable bench result \(nested too deeply\)"),
        ('{"format": "x"}', r"not an eurotrain-bench/1 result \(format 'x'\)"),
        (result(cluster=["a"]), r"'cluster' must be a cluster name or null"),
        (result(train=[{"mode": "weak"}]), r"train\[0\]: no 'nodes', which every train record"),
        (result(comms=[{"op": "all_reduce", "bytes": 8}]), r"comms\[0\]: no 'scope', which"),
        (result(train=[{"nodes": 1}, 7]), r"train\[1\]: not a record \(a JSON int, not an obj"),
        (result(train=[{"nodes": True}]), r"train\[0\]: 'nodes' is True, not a positive integer"),
        (result(train=[{"nodes": 0}]), r"train\[0\]: 'nodes' is 0, not a positive integer"),
        (result(train=[{"nodes": 1, "mode": None}, {"nodes": 2, "mode": 3}]), r"'mode' is 3"),
        (result(train=[{"nodes": 1, "mfu": "high"}]), r"'mfu' is 'high', not a finite number"),
        (result(train=[{"nodes": 1, "mfu": float("nan")}]), r"'mfu' is nan, not a finite"),
        (result(train=[{"nodes": 1, "layout": [2]}]), r"'layout' is \[2\], not an object of"),
        (result(train=[{"nodes": 1, "steps": -1}]), r"'steps' is -1, not a count"),
        (result(comms=[{"op": 1, "scope": "intra", "bytes": 8}]), r"'op' is 1, not a string"),
        (result(comms=[{"op": "x", "scope": "moon", "bytes": 8}]), r"'scope' is 'moon', not"),
        (result(comms=[{"op": "x", "scope": "inter", "bytes": "8K"}]), r"'bytes' is '8K', not"),
    ],
)
def test_a_bad_bench_file_is_refused_naming_file_record_and_field(tmp_path, text, message):
    directory = bench_file(tmp_path / "b", text)
    with pytest.raises(ConfigError, match=message) as info:
        read_results(directory)
    assert str(info.value).startswith(f"{directory / FILE}: ")
    assert "\n" not in str(info.value)


def test_report_and_calibrate_print_one_line_for_a_bad_record(tmp_path):
    """The reproducers' files, through the real command line: exit 2 and one line each."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    directory = bench_file(tmp_path / "b", result(train=[{"mode": "weak"}]))
    for cmd in (
        ["bench", "report", str(directory), "--out", str(tmp_path / "out")],
        ["plan", "tiny", "--cluster", "local", "--nodes", "1", "--steps", "10",
         "--calibrate", str(directory)],
    ):  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "eurotrain", *cmd], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        lines = [x for x in done.stderr.splitlines() if "warn" not in x.lower() and x.strip()]
        assert done.returncode == 2, done.stderr
        assert lines[-1].endswith(
            f"configuration error: {directory / FILE}: train[0]: no 'nodes', which every train "
            f"record needs; fix or remove that record, or measure again (`eurotrain bench train`)"
        ), done.stderr
        assert "Traceback" not in done.stderr


def test_calibrate_refuses_a_bad_record_in_any_of_several_files(tmp_path):
    bench_file(tmp_path / "good", result(cluster="mn5-acc", train=[{"nodes": 1, "mfu": 0.3}]))
    bench_file(tmp_path / "bad", result(cluster="mn5-acc", train=[{"nodes": 2, "mfu": [0.3]}]))
    plan = [str(REPO / "configs/tiny.yaml"), "--cluster", "mn5-acc", "--nodes", "1", "--steps",
            "10", "--calibrate", str(tmp_path)]  # fmt: skip
    with pytest.raises(ConfigError, match=r"bad/bench\.json: train\[0\]: 'mfu' is \[0\.3\]"):
        plan_main(plan)


def test_records_lacking_measurements_are_reported_with_dashes(tmp_path):
    """Only the required fields: the tables show "-" and the report is written."""
    directory = bench_file(tmp_path / "b", result(
        train=[{"nodes": 2, "mode": "weak", "layout": None}, {"nodes": 1, "tokens_per_s_per_gpu": 1000.0}],
        comms=[{"op": "all_reduce", "scope": "intra", "bytes": 8192}],
    ))  # fmt: skip
    data = read_results(directory)
    assert [r["nodes"] for r in data["train"]] == [2, 1]
    md = write_report([directory], tmp_path / "out").read_text()
    assert "| 2 | - | weak | 1 | - | - | - | - | - | - | - | - |" in md
    assert "| 1 | - |  | 1 | 1,000 | - |" in md
    assert "| intra | all_reduce | - | 8,192 B | - | - | - | - |" in md


def test_a_sweep_record_is_read_as_a_stranger(tmp_path):
    record = tmp_path / "record.json"
    record.write_text('{"ranks": "two"}')
    with pytest.raises(ConfigError, match=r"record\.json: 'ranks' is 'two', not a positive int"):
        _read_record(record, 1, "weak")
    record.write_text(DEEP)
    with pytest.raises(ConfigError, match=r"record\.json: unreadable \(nested too deeply\)"):
        _read_record(record, 1, "weak")
    record.write_text('{"ranks": 4, "tokens_per_s_per_gpu": null}')
    entry = _read_record(record, 2, "weak")
    assert entry == {"ranks": 4, "tokens_per_s_per_gpu": None, "nodes": 2, "mode": "weak"}
    assert summary([entry]).splitlines()[1].split() == ["2", "4", "-", "-", "-", "-", "-", "-"]
