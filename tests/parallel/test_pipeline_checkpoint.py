"""A rank holding several pipeline stages saves and loads checkpoints under the whole model's
parameter names: save under interleaved 1F1B (2 stages per rank), resume under ZBV and in one
process, and the next step's loss is the one the uninterrupted run had."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import TINY, overrides
from multiproc import run_distributed

from eurotrain.config import load_config

INTERLEAVED = {
    "parallel.pp": 2,
    "parallel.dp_shard": 1,
    "parallel.pp_schedule": "interleaved_1f1b",
    "parallel.pp_virtual_stages": 2,
}
ZBV = {"parallel.pp": 2, "parallel.dp_shard": 1, "parallel.pp_schedule": "zbv"}


def _train(out: str, run: str, layout: dict, steps: int) -> list[float]:
    from eurotrain.train import Trainer

    args = [*overrides(layout, out, run), "--train.steps", str(steps)]
    return Trainer(load_config(TINY, args)).train().losses


def _resume_args(out: str) -> dict:
    ckpt = Path(out) / "saved" / "checkpoints" / "step-000002"
    return {"checkpoint.resume": str(ckpt), "checkpoint.verify": "full"}


def save_then_resume(rank: int, world: int, out: str) -> tuple[list[float], list[float]]:
    saved = _train(out, "saved", {**INTERLEAVED, "checkpoint.interval": 2}, 3)
    resumed = _train(out, "zbv", {**ZBV, **_resume_args(out)}, 3)
    return saved, resumed


def test_virtual_stages_checkpoint_reshards(tmp_path):
    results = run_distributed(save_then_resume, 2, str(tmp_path))
    saved, resumed = results[-1]  # the rank holding the last stage
    assert len(saved) == 3 and len(resumed) == 1
    assert resumed[0] == pytest.approx(saved[2], rel=1e-5)
    single = _train(str(tmp_path), "single", _resume_args(str(tmp_path)), 3)
    assert single == pytest.approx([saved[2]], rel=1e-5)
