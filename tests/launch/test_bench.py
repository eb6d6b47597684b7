"""`eurotrain bench` on the real two-node SLURM of launch/testing/slurm_local.sh: a weak-scaling
sweep 1 -> 2 nodes and a comms sweep, both submitted with `eurotrain launch --bench`, then the
report with its plots. Checks contents and structure, never speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eurotrain.bench.results import FORMAT, read_results

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
SMALL = ["--data.seq_len", "32", "--train.global_batch_size", "4", "--train.micro_batch_size", "2"]


def _launch(slurm: dict, tmp: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "eurotrain", "launch", "--cluster", "local", "--nodes", "2",
           "--time", "00:10:00", "--wait", "--log-dir", str(tmp / "logs"), *args]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp, env=slurm, capture_output=True, text=True, timeout=300)
    logs = "\n".join(p.read_text() for p in (tmp / "logs").glob("*.out"))
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n{logs}"


@pytest.mark.slow
def test_weak_scaling_and_comms_sweeps_on_slurm_give_json_report_and_plots(slurm, tmp_path):
    _launch(slurm, tmp_path, "--bench", "train", "--sweep", "1,2", "--bench-steps", "3",
            "--bench-out", str(tmp_path / "train"), TINY, *SMALL)  # fmt: skip
    _launch(slurm, tmp_path, "--bench", "comms", "--sizes", "8K:32K",
            "--bench-out", str(tmp_path / "comms"))  # fmt: skip

    train = read_results(tmp_path / "train")
    assert train["format"] == FORMAT and train["cluster"] == "local"
    rows = train["train"]
    assert [(r["nodes"], r["ranks"], r["global_batch"]) for r in rows] == [(1, 2, 4), (2, 4, 8)]
    for r in rows:  # weak scaling: the per-GPU batch is kept
        assert r["mode"] == "weak" and r["steps"] == 3 and r["warmup_steps"] == 1
        assert r["tokens_per_s_per_gpu"] > 0 and r["step_time_s"] > 0
        assert 0 <= r["exposed_comm_s"] <= r["step_time_s"] and r["compute_s"] > 0
        assert r["layout"]["dp_shard"] == r["ranks"]
    assert rows[0]["scaling_efficiency"] == 1.0 and rows[1]["scaling_efficiency"] > 0

    comms = read_results(tmp_path / "comms")["comms"]
    scopes = {(r["scope"], r["op"], r["ranks"]) for r in comms}
    ops = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")
    assert scopes == {(s, op, n) for s, n in (("intra", 2), ("inter", 4)) for op in ops}
    for r in comms:
        assert r["bytes"] in (8192, 32768) and r["time_s"] > 0
        factor = {"all_reduce": 2 * (r["ranks"] - 1) / r["ranks"], "send_recv": 1.0}.get(
            r["op"], (r["ranks"] - 1) / r["ranks"]
        )
        assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"] * factor)
        assert r["algbw_GBps"] == pytest.approx(r["bytes"] / r["time_s"] / 1e9)

    report = subprocess.run(
        [sys.executable, "-m", "eurotrain", "bench", "report", str(tmp_path / "train"),
         str(tmp_path / "comms"), "--out", str(tmp_path / "report")],
        env=slurm, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| 2 | 4 | weak |" in md and "| inter | all_reduce | 4 |" in md
    for png in ("throughput.png", "efficiency.png", "busbw.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{png}]({png})" in md


def test_bad_sweeps_fail_before_anything_runs(tmp_path):
    def bench(*args: str, overrides: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "eurotrain", "bench", "train", "--out", str(tmp_path / "o"),
             *args, TINY, "--train.device", "cpu", *overrides],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
            env={**os.environ, "SLURM_JOB_ID": "", "PYTHONPATH": str(REPO)},
        )  # fmt: skip

    larger = bench("--nodes", "1,2")  # outside an allocation: one node at most
    assert larger.returncode == 2 and "2 node(s) asked for" in larger.stderr
    unfit = bench("--nodes", "1", "--gpus-per-node", "2", overrides=("--parallel.dp_shard", "4"))
    assert unfit.returncode == 2 and "does not fit 1 node(s) (2 ranks)" in unfit.stderr
    assert not (tmp_path / "o").exists()  # nothing ran, nothing was written
    assert "Traceback" not in larger.stderr + unfit.stderr


def test_report_refuses_what_is_not_a_bench_result(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps({"format": "something-else"}))
    out = subprocess.run(
        [sys.executable, "-m", "eurotrain", "bench", "report", str(tmp_path)],
        capture_output=True, text=True, timeout=60, env={**os.environ,
                                                         "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert out.returncode == 2 and "not an eurotrain-bench/1 result" in out.stderr


def test_bench_jobs_quote_every_user_word(tmp_path):
    payload = "$(touch MARKER)"
    script = subprocess.run(
        [sys.executable, "-m", "eurotrain", "launch", "--cluster", "local", "--nodes", "2",
         "--time", "00:10:00", "--dry-run", "--bench", "train", "--sweep", "1,2",
         "--bench-out", payload, TINY, "--train.run_name", payload],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert script.returncode == 0, script.stderr
    sweep = next(line for line in script.stdout.splitlines() if "bench train" in line)
    assert f"--out '{payload}'" in sweep and f"--train.run_name '{payload}'" in sweep
    assert "--nodes 1,2 --mode weak --steps 20" in sweep
    too_many = subprocess.run(
        [sys.executable, "-m", "eurotrain", "launch", "--cluster", "local", "--nodes", "1",
         "--time", "00:10:00", "--dry-run", "--bench", "train", "--sweep", "1,2", TINY],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert too_many.returncode == 2 and "--sweep 1,2: the job has --nodes 1" in too_many.stderr


def _comms_against(rank: int, world: int, figure: float) -> list[dict]:
    from eurotrain.bench.comms import run_comms

    return run_comms([4096], ("all_reduce",), iters=1, warmup=0, nominal={"intra": figure})


def test_comms_compares_bus_bandwidth_with_the_profiles_nominal_figure(tmp_path):
    from multiproc import run_distributed

    from eurotrain.bench.report import write_report
    from eurotrain.bench.results import new_results, write_results
    from eurotrain.clusters import load_profile

    figure = load_profile("mn5-acc").links.inter_node_GBps
    assert figure == 25.0  # 4x NDR200 per node, one per GPU
    (record,) = run_distributed(_comms_against, 2, 0.5)[0]
    assert record["nominal_GBps"] == 0.5
    assert record["busbw_fraction"] == pytest.approx(record["busbw_GBps"] / 0.5)
    results = new_results("mn5-acc", "cpu", 2, "gloo")
    results["comms"] = [record]
    write_results(tmp_path / "comms", results)
    report = write_report([tmp_path / "comms"], tmp_path / "report").read_text()
    share = f"{record['busbw_fraction']:.0%}"
    assert any(line.endswith(f"| {share} |") for line in report.splitlines()), report
