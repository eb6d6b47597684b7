"""Layouts that do not fit fail in check_layout(config, world_size), before any model exists,
naming the values and a layout that would fit. No processes needed."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eurotrain.config import load_config
from eurotrain.configtools import ConfigError
from eurotrain.parallel.ac import inductor_cpu_problem
from eurotrain.parallel.checks import balanced_split, check_layout

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


def cfg(**overrides):
    args = []
    for key, value in overrides.items():
        args += [f"--{key.replace('__', '.')}", str(value)]
    return load_config(TINY, args)


def fails(config, world: int, *needles: str, cuda: bool = False) -> str:
    with pytest.raises(ConfigError) as err:
        check_layout(config, world, cuda=cuda)
    message = str(err.value)
    for needle in needles:
        assert needle in message, message
    return message


def test_good_layouts_resolve():
    dims = check_layout(
        cfg(parallel__tp=2, parallel__pp=2, parallel__pp_microbatches=2), 8, cuda=False
    )
    assert (dims.pp, dims.dp_shard, dims.tp) == (2, 2, 2)
    assert check_layout(cfg(parallel__cp=2), 2, cuda=False).cp == 2


@pytest.mark.parametrize("schedule", ["zbv", "interleaved_zb"])
@pytest.mark.parametrize("ac", ["selective", "full"])
def test_zero_bubble_schedules_refuse_activation_checkpointing(schedule, ac):
    # Seen under torchrun: zbv + selective failed in the first step with "Trying to backward
    # an extra time"; here it is refused before any process starts.
    layout = {"parallel__pp": 2, "parallel__pp_schedule": schedule,
              "parallel__pp_microbatches": 2, "parallel__activation_checkpointing": ac}  # fmt: skip
    if schedule == "interleaved_zb":
        layout["parallel__pp_virtual_stages"] = 2
    fails(cfg(**layout), 2, f"pp_schedule = {schedule} with parallel.activation_checkpointing",
          "use pp_schedule 1f1b")  # fmt: skip
    layout["parallel__activation_checkpointing"] = "none"
    assert check_layout(cfg(**layout), 2, cuda=False).pp == 2


def test_product_must_match_world():
    fails(cfg(parallel__dp_shard=2, parallel__tp=2), 8, "needs 4 ranks", "8", "dp_shard=8")
    fails(cfg(parallel__tp=3), 8, "-1 cannot fill", "dp_shard=8")


def test_heads_and_kv_heads_divisible_by_tp():
    # tiny: 4 heads, 2 KV heads
    fails(cfg(parallel__tp=4), 4, "num_kv_heads = 2", "parallel.tp in {1, 2}")
    fails(cfg(model__num_kv_heads=4, model__num_heads=4, parallel__tp=8), 8, "num_heads = 4")


def test_fewer_layers_than_stages():
    fails(cfg(parallel__pp=8, parallel__dp_shard=1), 8, "num_layers = 4", "8 pipeline stages")
    fails(
        cfg(parallel__pp=4, parallel__dp_shard=1, parallel__pp_schedule="interleaved_1f1b",
            parallel__pp_virtual_stages=2, train__global_batch_size=16),
        4, "fewer than the 8 pipeline stages", "parallel.pp <= 2",
    )  # fmt: skip


def test_pp_layers_must_cover_the_model():
    c = cfg(parallel__pp=2, parallel__dp_shard=1)
    c.parallel.pp_layers = [1, 2]
    fails(c, 2, "[1, 2]", "summing to model.num_layers = 4", "[2, 2]")


def test_microbatches_fewer_than_stages():
    c = cfg(parallel__pp=2, parallel__dp_shard=1, parallel__pp_microbatches=1)
    fails(c, 2, "1 pipeline micro-batches", "parallel.pp_microbatches >= 2")
    c = cfg(parallel__pp=2, parallel__dp_shard=1, parallel__pp_microbatches=3)
    fails(c, 2, "does not divide the 16 sequences")


def test_interleaved_needs_virtual_stages():
    c = cfg(parallel__pp=2, parallel__dp_shard=1, parallel__pp_schedule="interleaved_1f1b")
    fails(c, 2, "pp_virtual_stages >= 2")
    with pytest.raises(ConfigError, match="interleaved schedule"):
        cfg(parallel__pp_virtual_stages=2)


def test_cp_sequence_and_heads():
    fails(cfg(parallel__cp=3, data__seq_len=128), 3, "data.seq_len = 128", "parallel.cp = 3")
    # 4 heads, 2 KV heads: Ulysses over cp=4 cannot split 2 KV heads
    fails(cfg(parallel__cp=4), 4, "2 key/value heads", "parallel.cp in {1, 2}")
    fails(cfg(parallel__cp=2, parallel__tp=2), 4, "1 key/value heads", "parallel.tp = 2")


def test_ring_cp_refuses_masks():
    fails(
        cfg(parallel__cp=2, parallel__cp_method="ring", data__document_positions=True), 2,
        "ring computes plain causal attention only, not data.document_positions", "ulysses",
        cuda=True,
    )  # fmt: skip
    fails(
        cfg(parallel__cp=2, parallel__cp_method="ring", model__sliding_window=64), 2,
        "not model.sliding_window = 64", cuda=True,
    )  # fmt: skip
    check_layout(cfg(parallel__cp=2, data__document_positions=True), 2, cuda=False)


def test_ring_cp_is_gpu_only():
    fails(cfg(parallel__cp=2, parallel__cp_method="ring"), 2, "needs GPUs", "ulysses")
    check_layout(cfg(parallel__cp=2, parallel__cp_method="ring"), 2, cuda=True)
    fails(
        cfg(parallel__cp=2, parallel__cp_method="ring", data__seq_len=126), 2,
        "divisible by 2 x parallel.cp = 4", "data.seq_len = 124", cuda=True,
    )  # fmt: skip


def test_deepspeed_axes_and_install(monkeypatch):
    fails(cfg(parallel__engine="deepspeed", parallel__tp=2), 4, "parallel.tp = 2", "engine = fsdp")
    fails(
        cfg(parallel__engine="deepspeed", parallel__dp_replicate=2, parallel__dp_shard=1), 2,
        "no replicate axis",
    )  # fmt: skip
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "deepspeed" else real(name, *a),
    )
    fails(cfg(parallel__engine="deepspeed"), 2, "DeepSpeed is not installed", "pip install")


def test_trainer_checks_before_building(tmp_path):
    """The Trainer refuses a bad layout before any model (or process group work) happens."""
    from eurotrain.train import Trainer

    c = cfg(parallel__tp=2, parallel__dp_shard=1, train__output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="needs 2 ranks but the job has 1"):
        Trainer(c)
    assert not any(tmp_path.iterdir())


def test_balanced_split():
    assert balanced_split(4, 2) == [2, 2]
    assert balanced_split(7, 3) == [3, 2, 2]


def test_cpu_offload_needs_a_gpu():
    fails(cfg(parallel__fsdp_cpu_offload=True), 2, "fsdp_cpu_offload = false")
    check_layout(cfg(parallel__fsdp_cpu_offload=True), 2, cuda=True)


MOE = str(Path(__file__).resolve().parents[2] / "configs" / "tiny-moe.yaml")


def moe_cfg(**overrides):
    args = ["--train.micro_batch_size", "1"]
    for key, value in overrides.items():
        args += [f"--{key.replace('__', '.')}", str(value)]
    return load_config(MOE, args)


def test_expert_parallel_layouts():
    dims = check_layout(moe_cfg(parallel__ep=2, parallel__tp=2), 8, cuda=False)
    assert (dims.dp_shard, dims.ep, dims.tp, dims.expert_dp) == (4, 2, 2, 2)
    assert check_layout(moe_cfg(parallel__tp=2), 2, cuda=False).tp == 2  # MoE under tp works
    fails(moe_cfg(parallel__ep=3, train__global_batch_size=12), 6, "parallel.ep = 3 does not divide model.moe.num_experts = 8",
          "parallel.ep in {1, 2}")  # fmt: skip
    fails(moe_cfg(parallel__ep=4, parallel__dp_shard=2, parallel__tp=2), 4,
          "parallel.ep = 4 does not divide parallel.dp_shard = 2", "{1, 2}")  # fmt: skip
    fails(cfg(parallel__ep=2), 2, "parallel.ep = 2 needs a mixture-of-experts model",
          "model.moe.num_experts = 0")  # fmt: skip
    fails(moe_cfg(parallel__ep=2, parallel__engine="deepspeed"), 2,
          "parallel.ep = 2 with parallel.engine = deepspeed", "parallel.engine = fsdp")  # fmt: skip
    fails(moe_cfg(parallel__tp=2, model__moe__expert_ffn_dim=33), 2,
          "does not divide the experts' hidden size model.moe.expert_ffn_dim = 33")  # fmt: skip
    fails(moe_cfg(parallel__ep=2, parallel__activation_checkpointing="selective"), 2,
          "activation_checkpointing = selective with parallel.ep = 2")  # fmt: skip
    with pytest.raises(ConfigError, match=r"parallel\.ep: 0 must be a positive integer"):
        moe_cfg(parallel__ep=0)


def test_reduce_every_microbatch_is_refused_where_others_reduce():
    """FSDP2's option: refused under DeepSpeed and pipelining, which reduce their own way;
    where nothing is sharded it changes nothing, so a config still runs on a smaller layout."""
    fails(
        cfg(parallel__engine="deepspeed", parallel__reduce_every_microbatch=True), 2,
        "parallel.reduce_every_microbatch", "ZeRO",
    )  # fmt: skip
    fails(
        cfg(parallel__pp=2, parallel__dp_shard=1, parallel__reduce_every_microbatch=True), 2,
        "parallel.reduce_every_microbatch", "pipeline schedule",
    )  # fmt: skip
    for world, extra in ((1, {}), (2, {"parallel__dp_replicate": 2, "parallel__dp_shard": 1})):
        check_layout(cfg(parallel__reduce_every_microbatch=True, **extra), world, cuda=False)


def test_cpu_compile_is_refused_where_a_path_would_split(tmp_path, monkeypatch):
    """torch 2.13's Inductor leaves its cache and library directories unquoted in the C++
    compile command, then splits it as a shell would: a CPU run that compiles where one holds
    whitespace, a quote or a backslash is refused at start-up, naming the path."""
    from eurotrain.parallel.checks import check_compile
    from eurotrain.train import Trainer

    spaced = str(tmp_path / "inductor cache")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", spaced)
    for compiling in (cfg(parallel__compile="true"), cfg(model__kernels="compile")):
        with pytest.raises(ConfigError, match="TORCHINDUCTOR_CACHE_DIR") as err:
            check_compile(compiling, "cpu")
        assert repr(spaced) in str(err.value) and "turn compiling off" in str(err.value)
        check_compile(compiling, "cuda")  # GPUs compile Triton: not this command
    check_compile(cfg(), "cpu")  # nothing compiles
    c = cfg(parallel__compile="true", train__output_dir=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"parallel\.compile: true: torch\.compile on a CPU"):
        Trainer(c)
    assert not (tmp_path / "out").exists()  # before the run directory

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    (tmp_path / "tmp dir").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp dir"))  # the default cache is under it
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    problem = inductor_cpu_problem()
    assert problem is not None and "tmp dir" in problem
    for name in ("it's", 'a"b', "a\\b"):  # shlex would split or choke on these too
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", f"/scratch/{name}/cache")
        assert repr(f"/scratch/{name}/cache") in (inductor_cpu_problem() or "")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/scratch/ü-$HOME/cache")  # neither
    assert "Inductor's cache directory" not in (inductor_cpu_problem() or "")


def test_cpu_compile_check_passes_clean_paths(monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/nonexistent/inductor-cache")
    problem = inductor_cpu_problem()
    # Where this checkout's own environment sits under a path with spaces, it says so.
    assert problem is None or "library directory" in problem


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="Inductor's CPU backend needs g++")
def test_inductor_still_breaks_on_a_cache_dir_with_spaces(tmp_path):
    """The premise of check_compile: if this starts passing, torch quotes its paths and the
    refusal can go (or be limited to the torch releases before the fix)."""
    code = "import torch; torch.compile(lambda x: torch.sin(x) + 1)(torch.randn(8))"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "a cache")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode != 0, "torch.compile worked with a space in its cache directory"
    assert "C++ compile error" in out.stderr, out.stderr[-2000:]
