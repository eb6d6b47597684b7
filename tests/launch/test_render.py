"""Rendered sbatch scripts: golden files for every EuroHPC profile, and bad input refused
before anything is submitted. EUROTRAIN_UPDATE_GOLDEN=1 rewrites the golden files (review the
diff: they are what users get)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from eurotrain.clusters import known_clusters, load_profile
from eurotrain.launch import main

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
CONFIG = "tests/launch/golden/config.yaml"  # relative: the scripts must not depend on the host
EUROHPC = [
    "mn5-acc", "lumi-g", "leonardo-booster", "jupiter-booster",
    "meluxina-gpu", "karolina-gpu", "vega-gpu", "deucalion-gpu",
]  # fmt: skip
UPDATE = os.environ.get("EUROTRAIN_UPDATE_GOLDEN") == "1"


def _render(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("SBATCH_ACCOUNT", raising=False)
    rc = main([*args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _compare(path: Path, text: str) -> None:
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with EUROTRAIN_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"{path.name} changed: review, then EUROTRAIN_UPDATE_GOLDEN=1"


def test_every_profile_loads_and_is_known():
    assert set(EUROHPC) | {"local"} == set(known_clusters())
    for name in known_clusters():
        profile = load_profile(name)
        assert profile.gpus_per_node >= 1 and profile.queues
    assert load_profile("jupiter-booster").cpu_arch == "aarch64"
    assert load_profile("lumi-g").comm.library == "rccl"


@pytest.mark.parametrize("nodes", [2, 64])
@pytest.mark.parametrize("cluster", EUROHPC)
def test_golden_scripts(cluster, nodes, capsys, monkeypatch, tmp_path):
    rc, out, err = _render(
        capsys, monkeypatch, "--cluster", cluster, "--nodes", str(nodes), "--time", "01:00:00",
        "--account", "myproject", "--python", "python3", "--dry-run", CONFIG,
    )  # fmt: skip
    if rc != 0:  # a machine smaller than 64 nodes: the refusal is the golden output
        _compare(GOLDEN / f"{cluster}-{nodes}.err", err)
        assert "nodes" in err
        return
    _compare(GOLDEN / f"{cluster}-{nodes}.sbatch", out)
    script = tmp_path / "job.sbatch"
    script.write_text(out)
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert f"#SBATCH --nodes={nodes}" in out and "--signal=B:USR1@300" in out


@pytest.mark.parametrize("cluster", ["jupiter-booster", "lumi-g"])
def test_golden_torchrun_in_container(cluster, capsys, monkeypatch):
    rc, out, err = _render(
        capsys, monkeypatch, "--cluster", cluster, "--nodes", "2", "--time", "01:00:00",
        "--account", "myproject", "--launcher", "torchrun", "--container", "/images/train.sif",
        "--dry-run", CONFIG, "--train.steps", "50",
    )  # fmt: skip
    assert rc == 0, err
    _compare(GOLDEN / f"{cluster}-2-torchrun-container.sbatch", out)
    runtime = {"jupiter-booster": "apptainer exec --nv", "lumi-g": "singularity exec --rocm"}
    assert "--rdzv-backend c10d" in out and f"{runtime[cluster]} " in out


# ---- bad input: a clear error, nothing submitted ------------------------------------------
def _refused(capsys, monkeypatch, *args: str) -> str:
    rc, out, err = _render(capsys, monkeypatch, *args)
    assert rc == 2 and out == "" and "submitted" not in err and "sbatch" not in err.split(":")[0]
    return err


BASE = ("--nodes", "2", "--time", "01:00:00", "--account", "p")


def test_unknown_cluster_lists_known_and_suggests(capsys, monkeypatch):
    err = _refused(capsys, monkeypatch, "--cluster", "lumi", *BASE, CONFIG)
    assert "unknown cluster 'lumi'" in err and "Did you mean 'lumi-g'?" in err
    assert "mn5-acc" in err and "deucalion-gpu" in err


def test_more_gpus_than_the_node_has(capsys, monkeypatch):
    err = _refused(
        capsys, monkeypatch, "--cluster", "mn5-acc", *BASE, "--gpus-per-node", "8", CONFIG
    )
    assert "--gpus-per-node 8" in err and "have 4 GPUs" in err


def test_walltime_above_the_queue_limit(capsys, monkeypatch):
    err = _refused(
        capsys, monkeypatch, "--cluster", "mn5-acc", "--nodes", "2", "--time", "03:00:00",
        "--account", "p", "--partition", "debug", CONFIG,
    )  # fmt: skip
    assert "--time 03:00:00 exceeds the 02:00:00 limit" in err and "--partition production" in err


def test_nodes_above_the_queue_size_suggest_the_queue_that_fits(capsys, monkeypatch):
    err = _refused(
        capsys, monkeypatch, "--cluster", "leonardo-booster", "--nodes", "128",
        "--time", "01:00:00", "--account", "p", CONFIG,
    )  # fmt: skip
    assert "--nodes 128" in err and "--partition bprod" in err


def test_missing_account(capsys, monkeypatch):
    err = _refused(
        capsys, monkeypatch, "--cluster", "lumi-g", "--nodes", "2", "--time", "01:00:00", CONFIG
    )
    assert "needs a project account" in err and "project_465" in err


def test_layout_that_does_not_fit(capsys, monkeypatch):
    err = _refused(
        capsys, monkeypatch, "--cluster", "mn5-acc", *BASE, CONFIG, "--parallel.tp", "3",
    )  # fmt: skip
    assert "8 ranks" in err and "parallel" in err


def test_layout_the_trainer_would_refuse_is_refused_before_submitting(capsys, monkeypatch):
    # tp=8 fills 2 nodes x 4 GPUs, but the tiny model's 4 heads cannot be split 8 ways.
    err = _refused(
        capsys, monkeypatch, "--cluster", "mn5-acc", *BASE, CONFIG, "--parallel.tp", "8",
    )  # fmt: skip
    assert "parallel.tp = 8 does not divide model.num_heads = 4" in err


def test_batch_that_does_not_split_over_the_ranks(capsys, monkeypatch):
    # 8 ranks with tp=2 leave 4 data-parallel ranks: 6 sequences do not split over them.
    err = _refused(
        capsys, monkeypatch, "--cluster", "mn5-acc", *BASE, CONFIG,
        "--train.global_batch_size", "6",
    )  # fmt: skip
    assert "8 ranks" in err and "train.global_batch_size (6) must be a multiple of" in err


def test_unknown_partition_lists_queues(capsys, monkeypatch):
    err = _refused(capsys, monkeypatch, "--cluster", "mn5-acc", *BASE, "--partition", "acc", CONFIG)
    assert "unknown partition 'acc'" in err and "acc_debug" in err
