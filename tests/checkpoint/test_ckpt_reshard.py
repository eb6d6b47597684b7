"""A checkpoint saved under one layout loads into others: same loss at the next step."""

from __future__ import annotations

import pytest
from ckpt_common import ddp_round_trip, resume_run, save_dp4_then_hsdp
from multiproc import run_distributed

REL = 1e-5  # fp32; the reduction order differs between layouts


@pytest.fixture(scope="module")
def dp4(tmp_path_factory):
    out = tmp_path_factory.mktemp("reshard")
    saved, hsdp = run_distributed(save_dp4_then_hsdp, 4, str(out))[0]
    return out, saved, hsdp


def _same_next_loss(dp4, losses):
    _, saved, _ = dp4
    assert len(losses) == 1, f"expected to resume at step 2 and run step 3, got {losses}"
    assert losses[0] == pytest.approx(saved[2], rel=REL)


def test_dp_shard4_to_hsdp(dp4):
    _same_next_loss(dp4, dp4[2])


def test_dp_shard4_to_dp_shard2(dp4):
    out = str(dp4[0])
    _same_next_loss(dp4, run_distributed(resume_run, 2, out, "dp2", {"dp_shard": 2})[0])


def test_dp_shard4_to_one_process(dp4):
    _same_next_loss(dp4, resume_run(0, 1, str(dp4[0]), "single", {}))


def test_dp_shard4_to_tp2_dp_shard2(dp4):
    out = str(dp4[0])
    losses = run_distributed(resume_run, 4, out, "tp2", {"tp": 2, "dp_shard": 2})[0]
    _same_next_loss(dp4, losses)


def test_dp_shard4_to_pp2(dp4):
    out = str(dp4[0])
    losses = run_distributed(resume_run, 2, out, "pp2", {"pp": 2, "dp_shard": 1})
    _same_next_loss(dp4, losses[-1])  # the last stage computes the loss


def test_ddp_checkpoints_reshard_to_and_from_fsdp(dp4):
    """Replicas only run through DDP (parallel/ddp.py): same parameter names, so checkpoints
    move between it and FSDP both ways."""
    from_fsdp, saved, to_fsdp = run_distributed(ddp_round_trip, 2, str(dp4[0]))[0]
    _same_next_loss(dp4, from_fsdp)
    assert len(to_fsdp) == 1 and to_fsdp[0] == pytest.approx(saved[2], rel=REL)
