"""The multi-stage pipeline schedules in the planner (docs/planner.md, "Multi-stage and
zero-bubble schedules"): PyTorch's order read for each rank, the zero-bubble schedules
enumerated where their memory is modelled, and what happens where the order cannot be read
(pure CPU arithmetic; the memory itself is checked against real steps in
test_memory_validation.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from eurotrain.config import load_config
from eurotrain.configtools import ConfigError
from eurotrain.parallel.checks import check_layout
from eurotrain.plan import schedules
from eurotrain.plan.layouts import candidates
from eurotrain.plan.memory import Setting, estimate

REPO = Path(__file__).resolve().parents[2]
LLAMA_8B = str(REPO / "configs" / "llama3-8b.yaml")
TINY_MOE = str(REPO / "configs" / "tiny-moe.yaml")


@pytest.mark.parametrize("schedule", ["interleaved_1f1b", "interleaved_zb", "zbv"])
@pytest.mark.parametrize("pp, micro", [(2, 2), (2, 8), (4, 8), (4, 12)])
def test_each_rank_runs_every_action_of_its_stages_once(schedule: str, pp: int, micro: int):
    if schedule == "interleaved_zb" and micro % pp:
        pytest.skip("interleaved_zb needs micro-batches a multiple of pp (check_layout)")
    kinds = "FB" if schedule == "interleaved_1f1b" else "FIW"
    for rank in range(pp):
        order = schedules.rank_order(schedule, pp, micro, 2, rank)
        stages = {s for _, s, _ in order}
        assert {schedules.stage_rank(schedule, pp, s) for s in stages} == {rank}
        assert sorted(order) == sorted(
            (k, s, mb) for k in kinds for s in stages for mb in range(micro)
        )
        # a micro-batch's forward comes first, its weight-gradient half (or backward) last
        for s in stages:
            for mb in range(micro):
                at = {k: order.index((k, s, mb)) for k in kinds}
                assert at["F"] == min(at.values()) and at[kinds[-1]] == max(at.values())


@pytest.mark.parametrize("pp, micro", [(2, 4), (4, 8), (4, 12), (8, 32), (16, 64)])
def test_bubble_from_the_order_matches_the_interleaved_formula(pp: int, micro: int) -> None:
    """Running every rank's order with a forward taking 1 and a backward 2 (3 when recomputed)
    gives interleaved 1F1B's published bubble, (p - 1) / (v m)."""
    for backward in (2.0, 3.0):
        got = schedules.bubble("interleaved_1f1b", pp, micro, 2, backward)
        assert got == pytest.approx((pp - 1) / (2 * micro))


@pytest.mark.parametrize("pp, micro", [(2, 4), (4, 8), (4, 16), (8, 32)])
def test_zero_bubble_bubble_matches_pytorchs_own_lock_step_order(pp: int, micro: int) -> None:
    """PyTorch pads its interleaved zero-bubble order with idle slots where an action waits
    (every action one slot long: F = I = W); the planner's run of the same order idles as long."""
    from torch.distributed.pipelining import schedules as torch_schedules

    s = object.__new__(torch_schedules.ScheduleInterleavedZeroBubble)
    s.pp_group_size, s._n_microbatches, s.n_local_stages = pp, micro, 2
    s.number_of_rounds = max(1, micro // pp)
    s.microbatches_per_round = micro // s.number_of_rounds
    s.pipeline_order = {r: s._calculate_single_rank_operations(r) for r in range(pp)}
    padded = s._add_bubbles_to_actions(2 * pp)
    slots = max(len(actions) for actions in padded.values())
    busy = max(sum(a is not None for a in actions) for actions in padded.values())
    assert schedules.bubble("interleaved_zb", pp, micro, 2, 2.0) == pytest.approx(slots / busy - 1)


def test_peak_follows_what_each_action_leaves_alive() -> None:
    # two micro-batches of one stage, F F I I W W: at the first W both micro-batches'
    # activations and kept gradients are alive, and both input gradients sent
    b = schedules.StageBytes(saved=100, forward=1, backward=150, kept_for_w=30, input_backward=5,
                             sent_backward=7)  # fmt: skip
    order = (("F", 1, 0), ("F", 1, 1), ("I", 1, 0), ("I", 1, 1), ("W", 1, 0), ("W", 1, 1))
    top = schedules.peak(order, {1: b}, weight_temporaries=2)
    assert (top.activations, top.kept_for_w, top.temporaries, top.sent) == (200, 60, 2, 14)
    # a whole backward replaces the micro-batch's activations by its own peak
    top = schedules.peak((("F", 1, 0), ("F", 1, 1), ("B", 1, 0)), {1: b}, 0)
    assert top.total == 100 + 150


def test_zero_bubble_schedules_are_planned_for_dense_models_without_checkpointing() -> None:
    cfg = load_config(LLAMA_8B, [])
    cands, _ = candidates(cfg, 32, 4)
    zb = [c for c in cands if c.cfg.parallel.pp_schedule in schedules.ZERO_BUBBLE]
    assert {c.cfg.parallel.pp_schedule for c in zb} == {"zbv", "interleaved_zb"}
    assert {c.cfg.parallel.activation_checkpointing for c in zb} == {"none"}
    for c in zb[:4]:
        assert estimate(c.cfg, c.dims, Setting(cuda=True)).total > 0
    moe, _ = candidates(load_config(TINY_MOE, []), 4, 4)
    assert moe and not [c for c in moe if c.cfg.parallel.pp_schedule in schedules.ZERO_BUBBLE]


def test_where_pytorchs_order_cannot_be_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PyTorch whose schedules compute their order differently: the zero-bubble schedules are
    not planned, and asked for explicitly they are one clear error; interleaved 1F1B falls
    back to counting its warm-up."""

    def unreadable(*args: object) -> tuple[schedules.Action, ...]:
        raise schedules.OrderUnavailable("no _calculate_single_rank_operations")

    monkeypatch.setattr(schedules, "rank_order", unreadable)
    cands, _ = candidates(load_config(LLAMA_8B, []), 32, 4)
    kinds = {c.cfg.parallel.pp_schedule for c in cands if c.dims.pp > 1}
    assert kinds == {"1f1b", "interleaved_1f1b"}
    pp = ["--parallel.dp_shard", "4", "--parallel.pp", "4", "--parallel.pp_virtual_stages", "2"]
    cfg = load_config(LLAMA_8B, [*pp, "--parallel.pp_schedule", "interleaved_1f1b"])
    assert estimate(cfg, check_layout(cfg, 16, cuda=True), Setting(cuda=True)).total > 0
    cfg = load_config(LLAMA_8B, [*pp, "--parallel.pp_schedule", "interleaved_zb"])
    with pytest.raises(
        ConfigError, match=r"interleaved_zb: .*no _calculate_single_rank_operations"
    ):
        estimate(cfg, check_layout(cfg, 16, cuda=True), Setting(cuda=True))
