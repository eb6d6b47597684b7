"""The planner's memory model against what the real training step allocates (docs/planner.md):
for each layout, the predicted bytes of parameters, gradients, optimizer state, activations and
buffers at the step's peak are within +-10 % of the peak measured on CPU by the PyTorch
profiler's allocation events, on every rank of real gloo processes (tests/plan/memtrace.py);
the ``SINGLE`` cases run in each of those processes alone, as one-process runs."""

from __future__ import annotations

import pytest
from memcases import TINY_MOE, load, measure_cases
from multiproc import run_distributed

from eurotrain.parallel.checks import check_layout
from eurotrain.plan.memory import Setting, estimate_ranks

RANKS = 2
FSDP, TP = ["--parallel.dp_shard", "2"], ["--parallel.dp_shard", "1", "--parallel.tp", "2"]
PP = ["--parallel.dp_shard", "1", "--parallel.pp", "2", "--model.tie_embeddings", "false"]
CP = ["--parallel.dp_shard", "1", "--parallel.cp", "2"]
DDP = ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "1"]
FULL = ["--parallel.activation_checkpointing", "full"]
SELECTIVE = ["--parallel.activation_checkpointing", "selective"]
CASES = [
    FSDP,
    [*FSDP, *FULL],
    # gradient accumulation: FSDP keeps unsharded gradients until the last micro-batch
    [*FSDP, "--train.micro_batch_size", "4", *SELECTIVE],
    [*TP, *SELECTIVE],
    PP,
    [*PP, *FULL],
    # 16 micro-batches: the multi-stage schedules keep every send until the step's end
    [
        *PP,
        "--parallel.pp_schedule",
        "interleaved_1f1b",
        "--parallel.pp_virtual_stages",
        "2",
        "--train.micro_batch_size",
        "1",
    ],
    # the zero-bubble schedules: activations kept from F to W, weight-op gradients from I to W
    [*PP, "--parallel.pp_schedule", "zbv"],
    [*PP, "--parallel.pp_schedule", "interleaved_zb", "--parallel.pp_virtual_stages", "2"],
    CP,
    # replicas only (DDP), with accumulation: the gradients stay views into DDP's buckets
    [*DDP, "--train.micro_batch_size", "4"],
    # mixture of experts (tiny-moe: a dense first block, 8 experts top 2, a shared expert);
    # FSDP without AC, PP with full AC and one process with AC full were also within 5 % when
    # measured (docs/planner.md) and are left out of the suite for its time
    [TINY_MOE, *FSDP, *FULL],
    [TINY_MOE, *FSDP, *SELECTIVE],
    [TINY_MOE, *PP],
    # expert parallelism (ep 2 inside dp_shard 2) and the MoE under tensor parallelism
    [TINY_MOE, *FSDP, "--parallel.ep", "2", *FULL],
    [TINY_MOE, *TP, *SELECTIVE],
]
SINGLE = [
    # one process each (no mesh; every rank runs it alone): mixture of experts, 2 micro-batches
    [TINY_MOE],
]


@pytest.fixture(scope="module")
def measured() -> list[list[dict[str, int]]]:
    """Bytes by rank and case, every case in one group of processes (reused)."""
    return run_distributed(measure_cases, RANKS, CASES, SINGLE, timeout=120)


def test_memory_prediction_matches_real_step(measured: list[list[dict[str, int]]]) -> None:
    failures = []
    for i, overrides in enumerate(CASES + SINGLE):
        world = RANKS if i < len(CASES) else 1
        cfg = load(overrides)
        dims = check_layout(cfg, world, cuda=False)
        predicted = estimate_ranks(cfg, dims, Setting(cuda=False))
        for rank in range(RANKS):
            # ranks are ordered pp outermost: rank r is pipeline rank r // (ranks // pp)
            est = predicted[rank // (RANKS // dims.pp) if world == RANKS else 0]
            peak = measured[rank][i]["peak"]
            ratio = est.model_bytes / peak
            if not 0.9 <= ratio <= 1.1:
                failures.append(
                    f"{overrides} rank {rank}: predicted {est.model_bytes} B, measured {peak} B "
                    f"({ratio:.3f})"
                )
    assert not failures, "\n".join(failures)
