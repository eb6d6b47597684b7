"""Rendered sbatch scripts: golden files for every EuroHPC profile, and bad input refused
before anything is submitted. EUROTRAIN_UPDATE_GOLDEN=1 rewrites the golden files (review the
diff: they are what users get)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from eurotrain.cli import main as cli_main
from eurotrain.clusters import known_clusters, load_profile
from eurotrain.errors import ConfigError

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
    rc = cli_main(["launch", *args])  # as the command line runs it: errors print one line
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


def test_golden_container_binds_the_run_data_and_checkpoints(capsys, monkeypatch):
    """--container binds the config's directories, the run and checkpoint directories (made
    first) and the data, each single-quoted; MeluXina loads its Apptainer module first."""
    rc, out, err = _render(
        capsys, monkeypatch, "--cluster", "meluxina-gpu", "--nodes", "2", "--time", "01:00:00",
        "--account", "p200001", "--container", "/project/home/p200001/images/train.sif",
        "--dry-run", CONFIG, "--train.output_dir", "/project/scratch/p200001/runs",
        "--checkpoint.dir", "/project/scratch/p200001/ckpt",
        "--data.corpus", "/project/home/p200001/text/*.jsonl",
        "--data.tokenizer", "/project/home/p200001/tokenizers/llama3",
    )  # fmt: skip
    assert rc == 0, err
    _compare(GOLDEN / "meluxina-gpu-2-container.sbatch", out)
    assert "mkdir -p -- /project/scratch/p200001/runs /project/scratch/p200001/ckpt" in out
    assert '--bind "$PWD"/tests/launch/golden --bind "$PWD"/configs' in out


@pytest.mark.parametrize(
    "given, rendered", [(None, "--cpu-bind=none"), ("cores", "--cpu-bind=cores")]
)
def test_cpu_binding_is_the_profiles_unless_given(given, rendered, capsys, monkeypatch):
    extra = [] if given is None else ["--cpu-bind", given]
    rc, out, err = _render(
        capsys, monkeypatch, "--cluster", "mn5-acc", "--nodes", "2", "--time", "01:00:00",
        "--account", "p", "--python", "python3", *extra, "--dry-run", CONFIG,
    )  # fmt: skip
    assert rc == 0, err
    (srun,) = [line for line in out.splitlines() if line.lstrip().startswith("srun ")]
    assert rendered in srun.split()


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


# ---- launch arguments that SLURM would misread or that cannot work --------------------------
def test_zero_gpus_per_node_is_refused_not_the_default(capsys, monkeypatch):
    err = _refused(
        capsys, monkeypatch, "--cluster", "mn5-acc", *BASE, "--gpus-per-node", "0", CONFIG
    )
    assert "--gpus-per-node 0:" in err and "choose 1..4" in err


@pytest.mark.parametrize(
    "seconds, time, says",
    [
        ("-1", "01:00:00", "--signal-seconds -1: must be at least 1"),
        ("0", "01:00:00", "--signal-seconds 0: must be at least 1"),
        ("3600", "01:00:00", "--signal-seconds 3600 is not shorter than --time 01:00:00"),
        ("7200", "01:00:00", "--signal-seconds 7200 is not shorter than --time 01:00:00"),
        ("70000", "2-00:00:00", "--signal-seconds 70000: SLURM takes at most 65535"),
    ],
)
def test_signal_seconds_outside_the_walltime(seconds, time, says, capsys, monkeypatch):
    err = _refused(
        capsys, monkeypatch, "--cluster", "mn5-acc", "--nodes", "2", "--time", time,
        "--account", "p", "--signal-seconds", seconds, CONFIG,
    )  # fmt: skip
    assert says in err and err.count("\n") == 1


@pytest.mark.parametrize("time", ["00:00:00", "0-00:00:00"])
def test_zero_walltime(time, capsys, monkeypatch):
    err = _refused(
        capsys, monkeypatch, "--cluster", "mn5-acc", "--nodes", "2", "--time", time,
        "--account", "p", CONFIG,
    )  # fmt: skip
    assert f"--time {time}: " in err and "no time limit" in err


def _known_node_limits() -> list[tuple[str, str, int]]:
    """(cluster, queue, a node count just outside a limit the profile knows)."""
    cases = []
    for name in known_clusters():
        for qname, q in load_profile(name).queues.items():
            if q.max_nodes:
                cases.append((name, qname, q.max_nodes + 1))
            if q.min_nodes > 1:
                cases.append((name, qname, q.min_nodes - 1))
    return cases


@pytest.mark.parametrize("cluster, queue, nodes", _known_node_limits())
def test_every_known_node_limit_is_enforced(cluster, queue, nodes, capsys, monkeypatch):
    err = _refused(
        capsys, monkeypatch, "--cluster", cluster, "--nodes", str(nodes), "--time", "00:10:00",
        "--account", "p", "--partition", queue, CONFIG,
    )  # fmt: skip
    assert f"--nodes {nodes}: {cluster} queue {queue!r} takes " in err


def test_an_unknown_limit_is_not_a_limit(capsys, monkeypatch):
    # MN5's production queue publishes no node limit; MeluXina's queues no walltime limit.
    rc, out, err = _render(
        capsys, monkeypatch, "--cluster", "mn5-acc", "--nodes", "256", "--time", "01:00:00",
        "--account", "p", "--python", "python3", "--dry-run", CONFIG,
    )  # fmt: skip
    assert rc == 0 and "#SBATCH --nodes=256" in out, err
    rc, out, err = _render(
        capsys, monkeypatch, "--cluster", "meluxina-gpu", "--nodes", "2", "--time", "9-00:00:00",
        "--account", "p", "--python", "python3", "--dry-run", CONFIG,
    )  # fmt: skip
    assert rc == 0 and "#SBATCH --time=9-00:00:00" in out, err


def test_a_longer_queue_is_suggested_only_if_it_takes_the_nodes(capsys, monkeypatch):
    # Leonardo's lprod allows 4 days but (as the profile has it) at most 3 nodes.
    args = ("--cluster", "leonardo-booster", "--time", "2-00:00:00", "--account", "p")
    err = _refused(capsys, monkeypatch, *args, "--nodes", "2", CONFIG)
    assert "--time 2-00:00:00 exceeds the 1-00:00:00 limit" in err and "--partition lprod" in err
    err = _refused(capsys, monkeypatch, *args, "--nodes", "8", CONFIG)
    assert "--time 2-00:00:00 exceeds" in err and "lprod" not in err


@pytest.mark.parametrize(
    "old, new, says",
    [
        (
            "max_nodes: 2 ",
            "max_nodes: 2\n    min_nodes: 3 ",
            "min_nodes = 3 is above max_nodes = 2",
        ),
        ("max_nodes: 2 ", "max_nodes: -1 ", "max_nodes = -1 must be >= 0"),
        ("max_nodes: 2 ", "min_nodes: 0 ", "min_nodes = 0 must be >= 1"),
        ('max_time: "01:00:00"', 'max_time: "00:00:00"', "max_time '00:00:00'"),
    ],
)
def test_queue_limits_in_a_profile_are_checked(old, new, says, tmp_path, monkeypatch):
    text = (REPO / "launch" / "clusters" / "local.yaml").read_text()
    assert old in text
    (tmp_path / "local.yaml").write_text(text.replace(old, new))
    monkeypatch.setenv("EUROTRAIN_CLUSTERS", str(tmp_path))
    with pytest.raises(ConfigError, match=re.escape(f"queues.debug.{says}")):
        load_profile("local")


# ---- prepared data: the trainer's start-up checks, before the job queues --------------------


def _prepared(tmp_path: Path, capsys) -> Path:
    from eurotrain.data.prepare import prepare

    text = tmp_path / "text"
    text.mkdir()
    for i in range(20):
        (text / f"{i}.txt").write_text(f"document {i} " * 40)
    prepare(str(text), "byte", str(tmp_path / "prepared"), workers=1)
    capsys.readouterr()  # what prepare printed
    return tmp_path / "prepared"


def test_missing_prepared_data_is_refused_before_submitting(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nowhere"
    err = _refused(
        capsys, monkeypatch, "--cluster", "mn5-acc", *BASE, CONFIG,
        "--data.sources", f"[{{path: {missing}}}]",
    )  # fmt: skip
    assert f"data.sources: {missing} does not exist (checked before submitting)" in err


def test_damaged_prepared_data_is_refused_before_submitting(tmp_path, capsys, monkeypatch):
    prepared = _prepared(tmp_path, capsys)
    manifest = prepared / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"dtype": "uint16"', '"dtype": "int16"'))
    err = _refused(
        capsys, monkeypatch, "--cluster", "mn5-acc", *BASE, CONFIG,
        "--data.sources", f"[{{path: {prepared}}}]",
    )  # fmt: skip
    assert "dtype is 'int16', not one of ('uint16', 'uint32')" in err


def test_data_for_a_larger_vocabulary_than_the_model_is_refused(tmp_path, capsys, monkeypatch):
    prepared = _prepared(tmp_path, capsys)
    err = _refused(
        capsys, monkeypatch, "--cluster", "mn5-acc", *BASE, CONFIG,
        "--data.sources", f"[{{path: {prepared}}}]", "--model.vocab_size", "128",
    )  # fmt: skip
    assert "has 257 tokens but model.vocab_size is 128" in err


def test_a_dry_run_renders_with_a_note_when_the_data_is_not_here(tmp_path, capsys, monkeypatch):
    """A script may be rendered away from the cluster's file systems: a note, not an error."""
    missing = tmp_path / "nowhere"
    rc, out, err = _render(
        capsys, monkeypatch, "--cluster", "mn5-acc", *BASE, "--dry-run", CONFIG,
        "--data.sources", f"[{{path: {missing}}}]",
    )  # fmt: skip
    assert rc == 0 and out.startswith("#!")
    assert f"note: data.sources: {missing} does not exist" in err
    assert "a submitted job would be refused here" in err


def test_good_prepared_data_renders_without_a_note(tmp_path, capsys, monkeypatch):
    prepared = _prepared(tmp_path, capsys)
    rc, out, err = _render(
        capsys, monkeypatch, "--cluster", "mn5-acc", *BASE, "--dry-run", CONFIG,
        "--data.sources", f"[{{path: {prepared}}}]",
    )  # fmt: skip
    assert rc == 0 and out.startswith("#!") and "note" not in err


# ---- memory: the planner's peak against the profile's GPU, before the job queues ------------


def test_a_layout_that_cannot_fit_the_gpu_gets_a_note(capsys, monkeypatch):
    """Llama 3 70B with FSDP over one node of four 64 GiB H100s: some 280 GiB of fp32 weights,
    gradients and Adam state per GPU. A note, not a refusal: GPU peaks are modelled, not
    measured."""
    rc, out, err = _render(
        capsys, monkeypatch, "--cluster", "mn5-acc", "--nodes", "1", "--time", "01:00:00",
        "--account", "p", "--dry-run", "configs/llama3-70b.yaml", "--parallel.dp_shard", "-1",
        "--parallel.tp", "1", "--parallel.pp", "1",
    )  # fmt: skip
    assert rc == 0 and out.startswith("#!")
    note = next(line for line in err.splitlines() if "the planner predicts" in line)
    assert "GiB per GPU for dp_shard=4, more than the 64 GiB of each NVIDIA H100" in note
    assert "`eurotrain plan CONFIG" in note


def test_a_layout_that_fits_gets_no_memory_note(capsys, monkeypatch):
    rc, _, err = _render(capsys, monkeypatch, "--cluster", "mn5-acc", *BASE, "--dry-run", CONFIG)
    assert rc == 0 and "the planner predicts" not in err


@pytest.mark.parametrize(
    "key, value",
    [
        ("checkpoint.resume", "/nonexistent/ckpt"),
        ("data.tokenizer", "/nonexistent/tok"),
        ("data.corpus", "/nonexistent/corpus"),
    ],
)
def test_a_path_the_run_reads_that_is_not_here_is_refused(key, value, capsys, monkeypatch):
    err = _refused(
        capsys, monkeypatch, "--cluster", "mn5-acc", *BASE, CONFIG, f"--{key}", value,
    )  # fmt: skip
    assert f"{key}: {value} does not exist (checked before submitting)" in err


@pytest.mark.parametrize("preset", [None, "/scratch/me/triton"])
def test_triton_cache_is_node_local_unless_set_at_submission(preset, capsys, monkeypatch):
    """Triton's default cache is ~/.triton/cache, in $HOME on the shared file system, written by
    every rank of every node; the job puts it in /tmp, and keeps a value the user submitted with."""
    rc, out, err = _render(
        capsys, monkeypatch, "--cluster", "leonardo-booster", "--nodes", "2", "--time",
        "01:00:00", "--account", "myproject", "--dry-run", CONFIG,
    )  # fmt: skip
    assert rc == 0, err
    (line,) = [x for x in out.splitlines() if "TRITON_CACHE_DIR" in x]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_CACHE_DIR"}
    if preset is not None:
        env["TRITON_CACHE_DIR"] = preset
    shown = subprocess.run(
        ["bash", "-euc", f'{line}\necho "$TRITON_CACHE_DIR"'], env=env,
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert shown == (preset or f"/tmp/triton-cache-{os.getuid()}")
