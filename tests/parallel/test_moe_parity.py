"""Mixture of experts under expert, tensor, data and pipeline parallelism: every layout trains the
tiny MoE model (aux loss and bias balancing both on) to the losses, gradient norms and final
parameters of one process (fp32, relative 1e-5), and a checkpoint saved at ep=2 resumes at ep=4
and in one process as if the run had never stopped.

Layouts of one world size share one group of real gloo processes (spawning is the cost).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from harness import REPO, overrides
from multiproc import run_distributed

MOE = str(REPO / "configs" / "tiny-moe.yaml")
RTOL = 1e-5
# 3 layers (the first dense), 3 steps: the bias moves twice, the aux loss reaches every router.
SHORT = ["--train.steps", "3", "--model.num_layers", "3"]

FOUR_RANKS = {
    "ep=2 dp_shard=2 (dp_replicate=2)": {
        "parallel.ep": 2, "parallel.dp_shard": 2, "parallel.dp_replicate": 2,
    },
    "ep=4": {"parallel.ep": 4, "parallel.dp_shard": 4},
    "ep=2 dp_shard=4": {"parallel.ep": 2, "parallel.dp_shard": 4},
    "ep=2 x tp=2": {"parallel.ep": 2, "parallel.dp_shard": 2, "parallel.tp": 2},
    "tp=2 (no sp) x dp_shard=2": {
        "parallel.tp": 2, "parallel.dp_shard": 2, "parallel.sequence_parallel": False,
    },
    "tp=2 sp x pp=2": {"parallel.tp": 2, "parallel.pp": 2, "parallel.dp_shard": 1},
    "ep=2 x pp=2": {"parallel.ep": 2, "parallel.dp_shard": 2, "parallel.pp": 2},
    "ep=2 x cp=2": {"parallel.ep": 2, "parallel.dp_shard": 2, "parallel.cp": 2},
    "ep=2 dp_shard=4 + full ac": {
        "parallel.ep": 2, "parallel.dp_shard": 4, "parallel.activation_checkpointing": "full",
    },
}  # fmt: skip


def _config(layout: dict[str, Any], out: str, name: str, extra: list[str] | None = None):
    from eurotrain.config import load_config

    layout = {"parallel.dp_shard": 1, **layout}
    return load_config(MOE, [*overrides(layout, out, name), *SHORT, *(extra or [])])


def _param_stats(trainer) -> dict[str, tuple[float, float, float]]:
    """{name: (sum, sum of squares, sum of magnitudes)} of every full parameter this rank's
    stages hold, and of the experts' biases (a collective per DTensor: every rank walks its
    parameters in the same order)."""
    stats = {}
    for name, p in trainer.model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        full = full.detach().double()
        stats[name] = (float(full.sum()), float(full.pow(2).sum()), float(full.abs().sum()))
    for name, b in trainer.model.named_buffers():
        if name.endswith("expert_bias"):
            b = b.detach().double()
            stats[name] = (float(b.sum()), float(b.pow(2).sum()), float(b.abs().sum()))
    return stats


def train_layouts(rank: int, world: int, layouts: list[dict], out: str) -> list[dict]:
    from eurotrain.train import Trainer

    results = []
    for i, layout in enumerate(layouts):
        trainer = Trainer(_config(layout, out, f"layout{i}"))
        got = trainer.train()
        experts = [p for n, p in trainer.model.named_parameters() if ".experts." in n]
        held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in experts)
        results.append(
            {
                "losses": got.losses,
                "grad_norms": got.grad_norms,
                "params": _param_stats(trainer),
                "expert_numel": (held, sum(p.numel() for p in experts)),
            }
        )
    return results


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return train_layouts(0, 1, [{}], str(tmp_path_factory.mktemp("moe-ref")))[0]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-6)


def _check(name: str, ranks: list[dict], reference: dict) -> list[str]:
    bad = []
    params: dict[str, tuple[float, float, float]] = {}
    for rank, got in enumerate(ranks):
        params.update(got["params"])
        if not got["losses"]:  # a pipeline stage without the output
            continue
        for key in ("losses", "grad_norms"):
            assert len(got[key]) == len(reference[key]) == 3
            for step, (a, b) in enumerate(zip(got[key], reference[key])):
                if not _close(a, b):
                    bad.append(f"{name} rank {rank} {key}[{step}]: {a} != {b} (one process)")
    assert set(params) == set(reference["params"]), name
    for pname, (s, sq, _) in params.items():
        rs, rsq, rl1 = reference["params"][pname]
        # A sum of weights of both signs nearly cancels: its rounding scales with the sum of
        # magnitudes, not with the sum (seen: w2's sum 0.0895 off by 1.2e-6 = 1.3e-5 of it,
        # 3e-9 of its magnitudes, while its sum of squares agreed to 1e-8).
        if not (abs(s - rs) <= RTOL * rl1 + 1e-12 and _close(sq, rsq)):
            bad.append(f"{name} {pname}: sum {s} / {rs}, sum of squares {sq} / {rsq}")
    return bad


def test_moe_layouts_match_one_process(reference, tmp_path):
    names = list(FOUR_RANKS)
    per_rank = run_distributed(train_layouts, 4, [FOUR_RANKS[n] for n in names], str(tmp_path))
    bad = []
    for i, name in enumerate(names):
        bad += _check(name, [ranks[i] for ranks in per_rank], reference)
    assert not bad, "MoE layouts drift from the one-process run:\n" + "\n".join(bad)
    # Each rank holds its share of the experts: 1 / (ep x tp x FSDP shards over the rest).
    shares = {
        "ep=4": 4,
        "ep=2 dp_shard=4": 4,
        "ep=2 x tp=2": 4,
        "ep=2 dp_shard=2 (dp_replicate=2)": 2,
    }
    for name, share in shares.items():
        for ranks in per_rank:
            held, total = ranks[names.index(name)]["expert_numel"]
            assert held * share == total, (name, held, total)


STEPS4 = ["--train.steps", "4"]


def _resume(out: str, run: str, layout: dict) -> tuple[list[float], list[float]]:
    from eurotrain.train import Trainer

    ckpt = Path(out) / "ep2" / "checkpoints" / "step-000002"
    resume = {"checkpoint.resume": str(ckpt), "checkpoint.verify": "full"}
    got = Trainer(_config({**layout, **resume}, out, run, STEPS4)).train()
    return got.losses, got.grad_norms


def save_ep2_resume_ep4(rank: int, world: int, out: str) -> tuple[tuple, tuple]:
    """Train 4 steps under ep=2 (dp_shard 4) saving at step 2, then resume step 2 under ep=4."""
    from eurotrain.train import Trainer

    saved_layout = {"parallel.ep": 2, "parallel.dp_shard": 4, "checkpoint.interval": 2}
    got = Trainer(_config(saved_layout, out, "ep2", STEPS4)).train()
    return (got.losses, got.grad_norms), _resume(
        out, "ep4", {"parallel.ep": 4, "parallel.dp_shard": 4}
    )


def test_checkpoint_reshards_between_ep_sizes(tmp_path):
    """Steps 3 and 4 after the resume: the loaded weights (step 3's loss) and the loaded Adam
    moments (step 4's) are those of the uninterrupted run."""
    saved, ep4 = run_distributed(save_ep2_resume_ep4, 4, str(tmp_path))[0]
    one = _resume(str(tmp_path), "ep1", {})
    assert len(saved[0]) == 4
    for resumed in (ep4, one):
        for got, want in zip(resumed, saved):
            assert got == pytest.approx(want[2:], rel=RTOL)
