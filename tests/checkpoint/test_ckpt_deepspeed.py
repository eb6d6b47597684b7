"""DeepSpeed runs checkpoint through the same atomic, checksummed layout as FSDP runs: a resume
is bit-exact under ZeRO-1, 2 and 3, and a checkpoint loads under another ZeRO stage, another
data-parallel size, and under FSDP (the same per-parameter keys), with the next step's loss
within fp32 rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
from ckpt_common import tiny_config
from multiproc import run_distributed

pytest.importorskip("deepspeed")

REL = 1e-5  # fp32; another partitioning adds in another order


def _engine(stage: int) -> dict:
    return {"engine": "deepspeed", "zero_stage": stage}


def saved_then_resumed(rank: int, world: int, out: str, stages: list[int]) -> dict:
    """Per ZeRO stage: 6 steps saving at step 3, then a fresh trainer resuming step 3."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from eurotrain.train import Trainer

    results = {}
    for stage in stages:
        ckpt = {"interval": 3, "keep_last": 0}
        first = Trainer(tiny_config(Path(out), f"z{stage}", 6, parallel=_engine(stage),
                                    checkpoint=ckpt)).train()  # fmt: skip
        resume = {"resume": str(Path(out) / f"z{stage}" / "checkpoints" / "step-000003")}
        again = Trainer(tiny_config(Path(out), f"z{stage}-again", 6, parallel=_engine(stage),
                                    checkpoint=resume)).train()  # fmt: skip
        results[stage] = (first.losses, again.losses)
    return results


def resume_elsewhere(rank: int, world: int, out: str, source: str, parallel: dict) -> list:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from eurotrain.train import Trainer

    resume = {"resume": str(Path(out) / source / "checkpoints" / "step-000003")}
    run = f"{source}-as-{'-'.join(f'{k}{v}' for k, v in parallel.items())}-{world}"
    cfg = tiny_config(Path(out), run, 4, parallel=parallel, checkpoint=resume)
    return Trainer(cfg).train().losses


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    return out, run_distributed(saved_then_resumed, 2, str(out), [1, 2, 3])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_is_bit_exact(saved, stage):
    _, per_rank = saved
    for results in per_rank:
        first, again = results[stage]
        assert len(first) == 6 and len(again) == 3
        assert again == first[3:], f"ZeRO-{stage}: {again} != {first[3:]}"


@pytest.mark.parametrize(
    "source, world, parallel",
    [
        ("z1", 2, _engine(3)),  # another ZeRO stage
        ("z3", 1, _engine(2)),  # another data-parallel size
        ("z2", 2, {"engine": "fsdp", "dp_shard": 2}),  # the other engine
    ],
    ids=["zero1-to-zero3", "two-ranks-to-one", "deepspeed-to-fsdp"],
)
def test_reshards(saved, source, world, parallel):
    out, per_rank = saved
    stage = int(source[1])
    want = per_rank[0][stage][0][3]  # the uninterrupted run's step 4
    losses = run_distributed(resume_elsewhere, world, str(out), source, parallel)[0]
    assert losses[0] == pytest.approx(want, rel=REL), (source, parallel, losses)
