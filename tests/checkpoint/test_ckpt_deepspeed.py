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


BUCKET = 1 << 16
"""parallel.zero_bucket_size: DeepSpeed's default allocates 5e8 elements (2 GB in fp32) per
process whatever the model's size; the tiny model's gradients span several of these."""


def _engine(stage: int) -> dict:
    return {"engine": "deepspeed", "zero_stage": stage, "zero_bucket_size": BUCKET}


STEPS, SAVED = 4, 2  # 4 steps saving at step 2; resumed runs do steps 3 and 4
ELSEWHERE = [("z1", _engine(3)), ("z2", {"engine": "fsdp", "dp_shard": 2})]
"""Checkpoints resumed, in the same two processes, under another ZeRO stage and under FSDP."""


def saved_then_resumed(rank: int, world: int, out: str, stages: list[int]) -> tuple[dict, dict]:
    """Per ZeRO stage: STEPS steps saving at SAVED, then a fresh trainer resuming SAVED; then
    the ELSEWHERE resumes (one group of processes for all of it)."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from eurotrain.train import Trainer

    results = {}
    for stage in stages:
        ckpt = {"interval": SAVED, "keep_last": 0}
        trainer = Trainer(tiny_config(Path(out), f"z{stage}", STEPS, parallel=_engine(stage),
                                      checkpoint=ckpt))  # fmt: skip
        assert trainer.engine.ds_optimizer.reduce_bucket_size == BUCKET  # type: ignore[attr-defined]
        first = trainer.train()
        again = Trainer(tiny_config(Path(out), f"z{stage}-again", STEPS, parallel=_engine(stage),
                                    checkpoint=_resume(out, f"z{stage}"))).train()  # fmt: skip
        results[stage] = (first.losses, again.losses)
    elsewhere = {
        (source, str(parallel)): resume_elsewhere(rank, world, out, source, parallel)
        for source, parallel in ELSEWHERE
    }
    return results, elsewhere


def _resume(out: str, source: str) -> dict:
    return {"resume": str(Path(out) / source / "checkpoints" / f"step-{SAVED:06d}")}


def resume_elsewhere(rank: int, world: int, out: str, source: str, parallel: dict) -> list:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from eurotrain.train import Trainer

    run = f"{source}-as-{'-'.join(f'{k}{v}' for k, v in parallel.items())}-{world}"
    cfg = tiny_config(Path(out), run, SAVED + 1, parallel=parallel, checkpoint=_resume(out, source))
    return Trainer(cfg).train().losses


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    return out, run_distributed(saved_then_resumed, 2, str(out), [1, 2, 3])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_is_bit_exact(saved, stage):
    _, per_rank = saved
    for results, _ in per_rank:
        first, again = results[stage]
        assert len(first) == STEPS and len(again) == STEPS - SAVED
        assert again == first[SAVED:], f"ZeRO-{stage}: {again} != {first[SAVED:]}"


def _next_loss_of_the_saved_run(per_rank: list, source: str) -> float:
    return per_rank[0][0][int(source[1])][0][SAVED]  # the uninterrupted run's step SAVED + 1


@pytest.mark.parametrize("case", range(len(ELSEWHERE)), ids=["zero1-to-zero3", "deepspeed-to-fsdp"])
def test_reshards_to_another_stage_and_engine(saved, case):
    _, per_rank = saved
    source, parallel = ELSEWHERE[case]
    want = _next_loss_of_the_saved_run(per_rank, source)
    for _, elsewhere in per_rank:
        losses = elsewhere[(source, str(parallel))]
        assert losses[0] == pytest.approx(want, rel=REL), (source, parallel, losses)


def test_reshards_to_another_data_parallel_size(saved):
    out, per_rank = saved
    want = _next_loss_of_the_saved_run(per_rank, "z3")
    losses = run_distributed(resume_elsewhere, 1, str(out), "z3", _engine(2))[0]
    assert losses[0] == pytest.approx(want, rel=REL), losses
