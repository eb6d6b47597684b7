"""The planner's memory model against what the real training step allocates (docs/planner.md):
for each layout, the predicted bytes of parameters, gradients, optimizer state, activations and
buffers at the step's peak are within +-10 % of the peak measured on CPU by the PyTorch
profiler's allocation events, in real gloo processes (tests/plan/memtrace.py)."""

from __future__ import annotations

import pytest
from memcases import load, measure_cases
from multiproc import run_distributed

from eurotrain.parallel.checks import check_layout
from eurotrain.plan.memory import Setting, estimate_ranks

PP = ["--parallel.dp_shard", "1", "--parallel.pp", "2", "--model.tie_embeddings", "false"]
CASES: list[tuple[int, list[str]]] = [
    (1, []),
    (1, ["--parallel.activation_checkpointing", "selective"]),
    (1, ["--parallel.activation_checkpointing", "full"]),
    (2, ["--parallel.dp_shard", "2"]),
    (2, ["--parallel.dp_shard", "2", "--parallel.activation_checkpointing", "full"]),
    # gradient accumulation: FSDP keeps unsharded gradients until the last micro-batch
    (
        2,
        [
            "--parallel.dp_shard",
            "2",
            "--train.micro_batch_size",
            "4",
            "--parallel.activation_checkpointing",
            "selective",
        ],
    ),
    (
        2,
        [
            "--parallel.dp_shard",
            "1",
            "--parallel.tp",
            "2",
            "--parallel.activation_checkpointing",
            "selective",
        ],
    ),
    (2, PP),
    (2, [*PP, "--parallel.activation_checkpointing", "full"]),
    (2, [*PP, "--parallel.pp_schedule", "interleaved_1f1b", "--parallel.pp_virtual_stages", "2"]),
    (2, ["--parallel.dp_shard", "1", "--parallel.cp", "2"]),
]


@pytest.fixture(scope="module")
def measured() -> list[list]:
    """Bytes by rank and case: one-rank cases in a group of one (an engine on one rank of a
    bigger group would still reach the others through the default group), the rest in one
    group of two."""
    one = [c for c in CASES if c[0] == 1]
    two = [c for c in CASES if c[0] == 2]
    alone = run_distributed(measure_cases, 1, one, timeout=120)[0]
    pair = run_distributed(measure_cases, 2, two, timeout=120)
    return [alone + pair[0], [None] * len(one) + pair[1]]


def test_memory_prediction_matches_real_step(measured: list[list]) -> None:
    failures = []
    for i, (ranks, overrides) in enumerate(CASES):
        cfg = load(overrides)
        dims = check_layout(cfg, ranks, cuda=False)
        predicted = estimate_ranks(cfg, dims, Setting(cuda=False))
        for rank in range(ranks):
            # ranks are ordered pp outermost: rank r is pipeline rank r // (ranks // pp)
            est = predicted[rank // (ranks // dims.pp)]
            peak = measured[rank][i]["peak"]
            ratio = est.model_bytes / peak
            if not 0.9 <= ratio <= 1.1:
                failures.append(f"{overrides} rank {rank}: predicted {est.model_bytes} B, "
                                f"measured {peak} B ({ratio:.3f})")  # fmt: skip
    assert not failures, "\n".join(failures)
