"""`eurotrain plan`: the ranked layouts, the recommendation and its command lines, and clear
errors for bad input and for "nothing fits" (pure CPU arithmetic: no model is built)."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any

import pytest

from eurotrain.cli import main as cli_main
from eurotrain.clusters import load_profile
from eurotrain.config import load_config
from eurotrain.configtools import ConfigError
from eurotrain.parallel.checks import check_layout
from eurotrain.plan.cli import main
from eurotrain.plan.memory import GIB, Setting, estimate
from eurotrain.plan.planner import DEEPSPEED_MARGIN

REPO = Path(__file__).resolve().parents[2]
LLAMA_8B = str(REPO / "configs" / "llama3-8b.yaml")
LLAMA_70B = str(REPO / "configs" / "llama3-70b.yaml")


def plan_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def leonardo_8b() -> list[str]:
    return [LLAMA_8B, "--cluster", "leonardo-booster", "--nodes", "2,4", "--tokens", "1e11"]


def test_plan_ranks_layouts_that_fit_and_pass_check_layout(
    capsys: pytest.CaptureFixture[str], leonardo_8b: list[str]
) -> None:
    out = plan_json(capsys, *leonardo_8b)
    usable = out["hardware"]["usable_gib"]
    assert out["steps"] == math.ceil(1e11 / (256 * 8192))
    assert set(out["layouts"]) == {"2", "4"}
    for nodes, rows in out["layouts"].items():
        assert rows, f"nothing listed for {nodes} nodes"
        # fastest first; a DeepSpeed layout only when more than 1 % faster than an FSDP one
        speeds = [r["tokens_per_s_per_gpu"] * (
            DEEPSPEED_MARGIN if r["overrides"].get("parallel.engine") == "deepspeed" else 1.0
        ) for r in rows]  # fmt: skip
        assert speeds == sorted(speeds, reverse=True)
        for row in rows:
            assert row["fits"] and row["memory_gib"]["total"] <= usable
            # every listed layout is one eurotrain itself accepts, with the memory reported
            words = [w for k, v in row["overrides"].items() for w in (f"--{k}", str(v))]
            cfg = load_config(LLAMA_8B, words)
            dims = check_layout(cfg, int(nodes) * 4, cuda=True)
            mem = estimate(cfg, dims, Setting(cuda=True))
            assert round(mem.total / GIB, 3) == row["memory_gib"]["total"]
            # more nodes for the same tokens: fewer days
    best = {n: rows[0] for n, rows in out["layouts"].items()}
    assert best["4"]["days"] < best["2"]["days"]


def test_recommendation_as_overrides_and_launch_line(
    capsys: pytest.CaptureFixture[str], leonardo_8b: list[str]
) -> None:
    out = plan_json(capsys, *leonardo_8b, "--seq-len", "4096", "--global-batch", "512")
    rec = out["recommended"]
    assert (out["seq_len"], out["global_batch"]) == (4096, 512)
    assert out["steps"] == math.ceil(1e11 / (512 * 4096))
    cfg = load_config(LLAMA_8B, rec["train_overrides"])
    assert cfg.train.steps == out["steps"] and cfg.data.seq_len == 4096
    dims = check_layout(cfg, rec["nodes"] * 4, cuda=True)
    assert estimate(cfg, dims, Setting(cuda=True)).total / GIB <= out["hardware"]["usable_gib"]
    words = shlex.split(rec["launch"])
    assert rec["jobs"] == math.ceil(rec["days"] / 1.0 - 1e-9)  # Leonardo's 24 h production queue
    assert rec["jobs"] > 1  # so the job is a chain, with checkpoints (the preset saves none)
    assert words[:11] == ["eurotrain", "launch", "--cluster", "leonardo-booster", "--nodes",
                          str(rec["nodes"]), "--time", "1-00:00:00", "--account", "ACCOUNT",
                          "--until-done"]  # fmt: skip
    assert words[11] == LLAMA_8B
    assert words[12:] == [*rec["train_overrides"], "--checkpoint.interval", "auto"]
    # The line renders a job as it stands (the account filled in; data paths are the preset's
    # placeholders, which the launcher does not need to exist).
    words[words.index("ACCOUNT")] = "acct"
    at = words.index(LLAMA_8B)  # options before the config, overrides after it
    assert cli_main([*words[1:at], "--dry-run", *words[at:]]) == 0, capsys.readouterr().err
    assert "#SBATCH --requeue" in capsys.readouterr().out
    # the recommendation is the cheapest of the node counts' best layouts
    bests = [rows[0]["gpu_hours"] for rows in out["layouts"].values()]
    assert rec["gpu_hours"] == min(bests)


def test_table_output(capsys: pytest.CaptureFixture[str]) -> None:
    args = [LLAMA_8B, "--cluster", "mn5-acc", "--nodes", "2", "--steps", "1000", "--top", "3"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "planner defaults: peak_tflops, intra_GBps, efficiency" in text  # MN5 has no peak
    assert "recommended (fewest GPU-hours): 2 nodes" in text
    assert "eurotrain launch --cluster mn5-acc --nodes 2 --time 3-00:00:00" in text
    days = float(text.split("\n  ")[-1].split(" days: ")[0])
    assert f"days: {math.ceil(days / 3)} job(s) of the default queue's 3-00:00:00" in text
    assert len([line for line in text.splitlines() if line.startswith("    2  ")]) == 3


def test_table_columns_stay_aligned_past_a_long_layout(capsys: pytest.CaptureFixture[str]) -> None:
    # dp_replicate=8 dp_shard=2 cp=2 mb=1 ac=selective rs=every (54 characters) is among these
    args = [LLAMA_8B, "--cluster", "leonardo-booster", "--nodes", "8", "--tokens", "1e12"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("nodes"))
    rows = lines[header + 1 : lines.index("", header)]
    assert any("dp_replicate=8 dp_shard=2 cp=2 mb=1 ac=selective rs=every" in r for r in rows)
    assert {len(r) for r in rows} == {len(lines[header])}  # the right edges line up
    gib = lines[header].index("GiB/GPU") + len("GiB/GPU") - 1  # and the memory column
    assert all(r[gib].isdigit() and r[gib + 1] == " " for r in rows)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cluster", "leonardo", "--nodes", "1", "--tokens", "1e9"],
         "unknown cluster 'leonardo'. Did you mean 'leonardo-booster'?"),
        (["--cluster", "lumi-g", "--nodes", "1", "--tokens", "0"],
         "--tokens 0: the token budget must be a positive number"),
        (["--cluster", "lumi-g", "--nodes", "1", "--tokens", "lots"], "--tokens 'lots'"),
        (["--cluster", "lumi-g", "--nodes", "1", "--steps", "0"], "--steps 0"),
        (["--cluster", "lumi-g", "--nodes", "0,2", "--steps", "5"], "--nodes '0,2'"),
        (["--cluster", "lumi-g", "--nodes", "1", "--steps", "5", "--max-memory-fraction", "1.5"],
         "--max-memory-fraction 1.5"),
        (["--cluster", "local", "--nodes", "1", "--steps", "5"], "the planner is for GPU clusters"),
        (["--cluster", "lumi-g", "--nodes", "1", "--steps", "5", "--seq-len", "99999"],
         "data.seq_len (99999) exceeds model.max_seq_len"),
    ],
)  # fmt: skip
def test_bad_input_is_one_clear_error(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        main([LLAMA_8B, *args])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_nothing_fits_says_what_would() -> None:
    with pytest.raises(ConfigError) as e:
        main([LLAMA_70B, "--cluster", "leonardo-booster", "--nodes", "1,2", "--tokens", "1e12"])
    msg = str(e.value)
    assert "nothing fits on 1, 2 node(s) of leonardo-booster" in msg
    assert "57.6 GiB usable" in msg and "full activation checkpointing and micro-batch 1" in msg
    nodes = int(msg.split("it fits from ")[1].split()[0])
    assert nodes > 2
    # and it does: planning on that many nodes succeeds
    assert main([LLAMA_70B, "--cluster", "leonardo-booster", "--nodes", str(nodes),
                 "--tokens", "1e12", "--json"]) == 0  # fmt: skip


def test_a_batch_that_no_layout_accepts_quotes_check_layout() -> None:
    with pytest.raises(ConfigError) as e:
        main([LLAMA_8B, "--cluster", "lumi-g", "--nodes", "8", "--steps", "5",
              "--global-batch", "4"])  # fmt: skip
    assert "passes the layout checks on 8 node(s) of 8 GPUs" in str(e.value)
    assert "train.global_batch_size (4) must be a multiple" in str(e.value)


def test_profile_figures_and_defaults() -> None:
    from eurotrain.plan.hardware import from_profile

    lumi = from_profile(load_profile("lumi-g"))
    assert (lumi.peak_tflops, lumi.inter_GBps, lumi.memory_gib) == (191.5, 12.5, 64)
    assert lumi.sources["peak_tflops"] == "profile" and lumi.sources["intra_GBps"] == "default"
    # a group spanning nodes shares the node's NICs: 8 GCDs of a node in one group get them all
    assert lumi.bus_GBps(8, spans_nodes=True) == min(lumi.intra_GBps, 100.0)
    assert lumi.bus_GBps(1, spans_nodes=True) == 12.5
    assert lumi.bus_GBps(8, spans_nodes=False) == lumi.intra_GBps


def test_when_more_nodes_cannot_help_it_says_why() -> None:
    with pytest.raises(ConfigError) as e:
        main([LLAMA_70B, "--cluster", "leonardo-booster", "--nodes", "1", "--tokens", "1e11",
              "--global-batch", "4"])  # fmt: skip
    assert "the global batch of 4 sequences no longer covers the data-parallel ranks" in str(
        e.value
    )


def test_the_eurotrain_command_prints_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from eurotrain.cli import main as eurotrain

    assert eurotrain(["plan", LLAMA_8B, "--cluster", "mn5", "--nodes", "1", "--steps", "1"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("eurotrain plan: ") and "unknown cluster 'mn5'" in err
    assert len(err.splitlines()) == 1


def test_deepspeed_zero_stages_are_planned_beside_fsdp(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Data-parallel-only layouts are also planned on DeepSpeed ZeRO-1/2/3; every listed layout
    is one eurotrain accepts, whichever engine the config names, and its memory is the one
    reported."""
    config = tmp_path / "ds.yaml"
    config.write_text(f"base: {LLAMA_8B}\nparallel:\n  engine: deepspeed\n")
    out = plan_json(capsys, str(config), "--cluster", "leonardo-booster", "--nodes", "8",
                    "--steps", "10", "--top", "400")  # fmt: skip
    rows = out["layouts"]["8"]
    engines = {(r["overrides"].get("parallel.engine", "deepspeed"),
                r["overrides"].get("parallel.zero_stage", 3)) for r in rows}  # fmt: skip
    assert ("fsdp", 3) in engines and ("deepspeed", 3) in engines, engines
    for row in rows:
        words = [w for k, v in row["overrides"].items() for w in (f"--{k}", str(v))]
        cfg = load_config(str(config), words)
        dims = check_layout(cfg, 32, cuda=True)
        assert (
            round(estimate(cfg, dims, Setting(cuda=True)).total / GIB, 3)
            == (row["memory_gib"]["total"])
        )


def test_fsdp_reduces_every_micro_batch_where_only_that_fits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Llama 3 8B on 2 Leonardo nodes (32 micro-batches per step): FSDP2 over the 8 GPUs keeps
    every unsharded fp32 gradient when it reduces after the last micro-batch (~30 GiB), which
    does not fit; reducing after each one it does, and the planner recommends that, as an
    override eurotrain accepts."""
    cfg = load_config(LLAMA_8B, ["--parallel.dp_shard", "8", "--train.micro_batch_size", "1",
                                 "--parallel.activation_checkpointing", "selective"])  # fmt: skip
    dims = check_layout(cfg, 8, cuda=True)
    usable = load_profile("leonardo-booster").accelerator.memory_gib * 0.9 * GIB
    last = estimate(cfg, dims, Setting(cuda=True))
    every_cfg = load_config(LLAMA_8B, ["--parallel.dp_shard", "8", "--train.micro_batch_size",
                                       "1", "--parallel.activation_checkpointing", "selective",
                                       "--parallel.reduce_every_microbatch", "true"])  # fmt: skip
    every = estimate(every_cfg, check_layout(every_cfg, 8, cuda=True), Setting(cuda=True))
    assert last.total > usable > every.total
    assert last.grads - every.grads > 25 * GIB  # the unsharded fp32 gradients, 8.03e9 x 4 B
    out = plan_json(capsys, LLAMA_8B, "--cluster", "leonardo-booster", "--nodes", "2",
                    "--tokens", "1e11", "--top", "400")  # fmt: skip
    rows = {r["layout"]: r for r in out["layouts"]["2"]}
    row = rows["dp_shard=8 mb=1 ac=selective rs=every"]
    assert row["overrides"]["parallel.reduce_every_microbatch"] is True
    assert row["memory_gib"]["total"] == round(every.total / GIB, 3)
    assert "dp_shard=8 mb=1 ac=selective" not in rows  # it does not fit
    assert out["recommended"]["layout"] == row["layout"]
    assert "--parallel.reduce_every_microbatch true" in out["recommended"]["launch"]
