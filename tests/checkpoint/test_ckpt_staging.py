"""Staging a state dict to host memory: a snapshot of the values at save time, copied in pieces
that the background thread and a waiting trainer share."""

from __future__ import annotations

import threading

import pytest
import torch

from eurotrain.checkpoint.staging import Staged, Stager


def _state() -> dict:
    torch.manual_seed(0)
    tied = torch.randn(300, 7)
    return {
        "model": {"big": torch.randn(10_000), "tied": tied, "head": tied, "empty": torch.zeros(0)},
        "optim": {"state": [{"exp_avg": torch.randn(40, 30).t()}], "lr": 0.1},  # a strided view
        "step": 3,
    }


@pytest.mark.parametrize("chunk", [1 << 10, 16 << 20])
def test_staged_values_are_those_at_save_time(chunk):
    state = _state()
    before = {
        "big": state["model"]["big"].clone(),
        "tied": state["model"]["tied"].clone(),
        "exp_avg": state["optim"]["state"][0]["exp_avg"].clone(),
    }
    stager = Stager(shared=True, cuda=False, chunk=chunk)
    staged = stager.stage(state)
    staged.wait()
    assert staged.done
    for live in (
        state["model"]["big"],
        state["model"]["tied"],
        state["optim"]["state"][0]["exp_avg"],
    ):
        live.add_(1.0)  # the next optimizer step, after the wait
    model = staged.state["model"]
    assert torch.equal(model["big"], before["big"])
    assert torch.equal(model["tied"], before["tied"])
    assert model["head"].data_ptr() == model["tied"].data_ptr()  # tied weights staged once
    assert model["empty"].numel() == 0
    assert torch.equal(staged.state["optim"]["state"][0]["exp_avg"], before["exp_avg"])
    assert staged.state["optim"]["lr"] == 0.1 and staged.state["step"] == 3
    staged.release()
    stager.close()


def test_the_waiting_thread_copies_what_is_left():
    """The background thread is held inside its first piece until the waiting thread has done
    the others: wait() returns only when all are done, and the rest ran on the caller."""
    ran_on: dict[int, str] = {}
    first_taken, others_done = threading.Event(), threading.Event()

    def first() -> None:
        ran_on[0] = threading.current_thread().name
        first_taken.set()
        assert others_done.wait(30)

    def other(i: int) -> None:
        ran_on[i] = threading.current_thread().name
        if len(ran_on) == 4:
            others_done.set()

    staged = Staged({}, None)
    staged._start([first] + [lambda i=i: other(i) for i in (1, 2, 3)])
    assert first_taken.wait(30)
    staged.wait()
    assert staged.done
    assert ran_on[0] == "eurotrain-ckpt-stage"
    assert {ran_on[i] for i in (1, 2, 3)} == {threading.current_thread().name}


def test_a_failed_piece_is_raised_and_the_rest_dropped():
    ran: list[int] = []

    def fail() -> None:
        raise OSError("copy failed")

    staged = Staged({}, None)
    staged._start([fail] + [lambda i=i: ran.append(i) for i in range(50)])
    assert staged._done.wait(30)  # the background thread alone: failed, then dropped the rest
    with pytest.raises(OSError, match="copy failed"):
        staged.wait()
    assert ran == []
