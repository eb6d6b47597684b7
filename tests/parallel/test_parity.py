"""The parity matrix: every layout trains the tiny model for 5 optimizer steps to the same losses
and gradient norms as one process (fp32, relative 1e-5), and each rank holds the expected share
of parameters, gradients and optimizer state.

Layouts of one world size run one after another inside one group of real gloo processes
(tests/parallel/harness.py): spawning and importing torch is most of the cost on 2 cores.
"""

from __future__ import annotations

import math

import pytest
from harness import TINY, FirstGradients, first_gradient_problems, overrides, train_layouts
from multiproc import run_distributed

from eurotrain.config import load_config
from eurotrain.parallel.ac import inductor_cpu_problem
from eurotrain.train import Trainer

CPU_COMPILE = inductor_cpu_problem()  # a path with spaces or quotes breaks CPU compiling
RTOL = 1e-5  # fp32; differences come from reduction order only (seen: <= 4e-7)

TWO_RANKS = {
    # DDP, with gradient accumulation: the first micro-batch accumulates without syncing, the
    # second syncs; the gradients stay views into DDP's buckets across steps (zeroed in place)
    "dp_replicate=2 2 micro-batches": {"parallel.dp_replicate": 2, "parallel.dp_shard": 1},
    # FSDP2 accumulating 2 micro-batches: gradients reduced after the last one (the default),
    # or after each with only sharded gradients kept in between (reduce_every_microbatch)
    "dp_shard=2": {"parallel.dp_shard": 2},
    "dp_shard=2 reduce every micro-batch": {
        "parallel.dp_shard": 2,
        "parallel.reduce_every_microbatch": True,
    },
    "tp=2": {"parallel.tp": 2, "parallel.sequence_parallel": False},
    "tp=2 sp": {"parallel.tp": 2, "parallel.sequence_parallel": True},
    "pp=2 1f1b": {"parallel.pp": 2},
    "pp=2 gpipe": {"parallel.pp": 2, "parallel.pp_schedule": "gpipe"},
    "pp=2 interleaved_1f1b v=2": {
        "parallel.pp": 2,
        "parallel.pp_schedule": "interleaved_1f1b",
        "parallel.pp_virtual_stages": 2,
    },
    "pp=2 zbv": {"parallel.pp": 2, "parallel.pp_schedule": "zbv"},
    "pp=2 interleaved_zb v=2": {
        "parallel.pp": 2,
        "parallel.pp_schedule": "interleaved_zb",
        "parallel.pp_virtual_stages": 2,
    },
    "pp=2 1f1b layers [1,3]": {"parallel.pp": 2, "parallel.pp_layers": "[1,3]"},
    "cp=2 ulysses": {"parallel.cp": 2},
    # activation checkpointing and FSDP options composed with the other axes
    "dp_shard=2 no reshard": {"parallel.dp_shard": 2, "parallel.reshard_after_forward": False},
    "tp=2 sp + selective ac": {"parallel.tp": 2, "parallel.activation_checkpointing": "selective"},
    # (zero-bubble schedules refuse checkpointing: tests/parallel/test_checks.py)
    "pp=2 interleaved_1f1b v=2 + full ac": {
        "parallel.pp": 2,
        "parallel.pp_schedule": "interleaved_1f1b",
        "parallel.pp_virtual_stages": 2,
        "parallel.activation_checkpointing": "full",
    },
    "cp=2 + full ac": {"parallel.cp": 2, "parallel.activation_checkpointing": "full"},
}
FOUR_RANKS = {
    "dp_shard=4": {"parallel.dp_shard": 4},
    "hsdp 2x2": {"parallel.dp_replicate": 2, "parallel.dp_shard": 2},
    "dp_shard=2 x tp=2": {"parallel.dp_shard": 2, "parallel.tp": 2},
    "pp=2 x tp=2": {"parallel.pp": 2, "parallel.tp": 2},
    "dp_shard=2 x cp=2": {"parallel.dp_shard": 2, "parallel.cp": 2},
}
EIGHT_RANKS = {
    "pp=2 x dp_shard=2 x tp=2": {"parallel.pp": 2, "parallel.dp_shard": 2, "parallel.tp": 2}
}
DEEPSPEED = {
    f"deepspeed zero-{stage}": {
        "parallel.engine": "deepspeed",
        "parallel.zero_stage": stage,
        "parallel.dp_shard": 2,
    }
    for stage in (1, 2, 3)
}


def _with_defaults(layout: dict) -> dict:
    # Axes not named are 1 (dp_shard defaults to -1, "the rest").
    return {"parallel.dp_shard": 1, **layout} if "parallel.dp_shard" not in layout else layout


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, same config: the losses and gradient norms every layout must reproduce."""
    out = str(tmp_path_factory.mktemp("ref"))
    first = FirstGradients()
    trainer = Trainer(load_config(TINY, overrides({}, out, "single")), callbacks=[first])
    result = trainer.train()
    total = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    norms = sum(p.numel() * 4 for n, p in trainer.model.named_parameters() if "norm" in n)
    return {
        "losses": result.losses,
        "grad_norms": result.grad_norms,
        "first_grads": first.fingerprints,
        "bytes": total,
        "norm_bytes": norms,
    }


def _run(layouts: dict, world: int, tmp_path) -> dict[str, list[dict]]:
    names = list(layouts)
    per_rank = run_distributed(
        train_layouts, world, [_with_defaults(layouts[n]) for n in names], str(tmp_path)
    )
    return {name: [rank_results[i] for rank_results in per_rank] for i, name in enumerate(names)}


def _check_parity(results: dict[str, list[dict]], reference: dict) -> None:
    bad = []
    for name, ranks in results.items():
        for rank, got in enumerate(ranks):
            for key in ("losses", "grad_norms"):
                for step, (a, b) in enumerate(zip(got[key], reference[key])):
                    if not math.isclose(a, b, rel_tol=RTOL):
                        bad.append(f"{name} rank {rank} {key}[{step}]: {a} != {b} (single)")
            assert len(got["losses"]) == len(reference["losses"]) == 5
        bad += first_gradient_problems(name, ranks, reference["first_grads"], RTOL)
    assert not bad, "layouts drift from the single-process run:\n" + "\n".join(bad)


def test_two_ranks(reference, tmp_path):
    results = _run(TWO_RANKS, 2, tmp_path)
    _check_parity(results, reference)
    total = reference["bytes"]
    for name in ("dp_shard=2", "cp=2 ulysses"):  # FSDP shards over dp_shard x cp
        for got in results[name]:
            assert got["bytes"] == {"params": total // 2, "grads": total // 2, "optim": total}
    for got in results["dp_replicate=2 2 micro-batches"]:  # full replicas, through DDP
        assert got["bytes"] == {"params": total, "grads": total, "optim": 2 * total}
        assert got["data_parallel"] == "ddp"
    assert all(got["data_parallel"] == "fsdp" for got in results["dp_shard=2"])
    # what the engine asked of FSDP2 / DDP before each micro-batch of each step
    for name, syncs in (
        ("dp_replicate=2 2 micro-batches", [False, True]),
        ("dp_shard=2", [False, True]),
        ("dp_shard=2 reduce every micro-batch", [True, True]),
    ):
        for got in results[name]:
            assert got["grad_syncs"] == syncs * 5, f"{name}: {got['grad_syncs']}"
    for name in ("pp=2 1f1b", "pp=2 zbv"):  # each stage holds its own blocks only
        assert sum(r["bytes"]["params"] for r in results[name]) == total
    # tp: weights split in two; norms (sequence parallel: replicated) kept whole on each rank
    expected = total // 2 + reference["norm_bytes"] // 2
    for got in results["tp=2 sp"]:
        assert got["bytes"]["params"] == expected
        assert got["bytes"]["optim"] == 2 * expected


def test_four_ranks(reference, tmp_path):
    results = _run(FOUR_RANKS, 4, tmp_path)
    _check_parity(results, reference)
    total, norms = reference["bytes"], reference["norm_bytes"]
    for got in results["dp_shard=4"]:
        assert got["bytes"] == {"params": total // 4, "grads": total // 4, "optim": total // 2}
    for got in results["hsdp 2x2"]:  # a replicate axis with shards stays FSDP2 (HSDP)
        assert got["bytes"] == {"params": total // 2, "grads": total // 2, "optim": total}
        assert got["data_parallel"] == "fsdp"
    expected = total // 4 + norms // 4  # norms replicated over tp, sharded over dp
    for got in results["dp_shard=2 x tp=2"]:
        assert got["bytes"] == {"params": expected, "grads": expected, "optim": 2 * expected}


@pytest.mark.slow
def test_eight_ranks(reference, tmp_path):
    _check_parity(_run(EIGHT_RANKS, 8, tmp_path), reference)


@pytest.mark.slow
def test_deepspeed_zero(reference, tmp_path):
    _check_parity(_run(DEEPSPEED, 2, tmp_path), reference)


@pytest.mark.parametrize(
    "layout",
    [
        {"parallel.activation_checkpointing": "full"},
        {"parallel.activation_checkpointing": "full", "parallel.ac_every": 2},
        {"parallel.activation_checkpointing": "selective"},
    ],
    ids=["ac-full", "ac-full-every-2", "ac-selective"],
)
def test_activation_checkpointing_single_process(reference, tmp_path, layout):
    result = Trainer(load_config(TINY, overrides(layout, str(tmp_path), "ac"))).train()
    _check_parity({"ac": [{"losses": result.losses, "grad_norms": result.grad_norms}]}, reference)


@pytest.mark.slow
@pytest.mark.skipif(CPU_COMPILE is not None, reason=f"the trainer refuses it: {CPU_COMPILE}")
def test_compile_per_block_single_process(reference, tmp_path):
    """block.compile() in place: same numbers, same parameter names."""
    trainer = Trainer(load_config(TINY, overrides({"parallel.compile": True}, str(tmp_path), "c")))
    result = trainer.train()
    assert all("_orig_mod" not in name for name, _ in trainer.model.named_parameters())
    _check_parity(
        {"compile": [{"losses": result.losses, "grad_norms": result.grad_norms}]}, reference
    )
