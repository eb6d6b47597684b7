"""The callback life cycle: every hook in order, errors, and stateful callbacks kept by checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
from checkpoint.ckpt_common import Interrupt, StopAfter, tiny_config

from eurotrain.callbacks import HOOKS, Callback
from eurotrain.train import Trainer


class Record(Callback):
    """Every hook, as (hook, step) in call order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int | None]] = []

    def on_train_start(self, trainer):
        self.events.append(("on_train_start", trainer.state.step))

    def on_step_start(self, trainer, step):
        self.events.append(("on_step_start", step))

    def on_before_optimizer_step(self, trainer, step):
        # Gradients are final here: every parameter has one.
        assert all(p.grad is not None for p in trainer.model.parameters())
        self.events.append(("on_before_optimizer_step", step))

    def on_step_end(self, trainer, step, metrics):
        self.events.append(("on_step_end", step))

    def on_eval_end(self, trainer, step, metrics):
        assert set(metrics) == {"val_loss"}
        self.events.append(("on_eval_end", step))

    def on_checkpoint_saved(self, trainer, step, path):
        assert Path(path).name == f"step-{step:06d}"
        self.events.append(("on_checkpoint_saved", step))

    def on_error(self, trainer, error):
        self.events.append(("on_error", trainer.state.step))

    def on_train_end(self, trainer, result):
        self.events.append(("on_train_end", trainer.state.step))


class Counter(Callback):
    """A stateful callback: counts the steps it saw, across restarts."""

    name = "counter"

    def __init__(self) -> None:
        self.seen = 0
        self.at_start = -1

    def on_train_start(self, trainer):
        self.at_start = self.seen

    def on_step_end(self, trainer, step, metrics):
        self.seen += 1

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def test_every_hook_in_order(tmp_path):
    record = Record()
    cfg = tiny_config(
        tmp_path, "run", 4,
        train={"eval_interval": 2, "eval_batches": 1},
        data={"validation_fraction": 0.05},
        checkpoint={"interval": 2, "async_save": False},
    )  # fmt: skip
    Trainer(cfg, callbacks=[record]).train()
    steps = [
        [("on_step_start", s), ("on_before_optimizer_step", s), ("on_step_end", s)]
        for s in range(1, 5)
    ]
    assert (
        record.events
        == [
            ("on_train_start", 0),
            *steps[0],
            *steps[1][:2],
            ("on_eval_end", 2),  # inside the built-in callbacks' on_step_end of step 2
            steps[1][2],
            ("on_checkpoint_saved", 2),  # the checkpoint comes after every other callback
            *steps[2],
            *steps[3][:2],
            ("on_eval_end", 4),
            steps[3][2],
            ("on_checkpoint_saved", 4),  # the final save
            ("on_train_end", 4),
        ]
    )
    assert {hook for hook, _ in record.events} == set(HOOKS) - {"on_error"}


def test_an_error_reaches_every_callback_then_propagates(tmp_path):
    record = Record()
    with pytest.raises(Interrupt):
        Trainer(tiny_config(tmp_path, "run", 4), callbacks=[StopAfter(2), record]).train()
    assert record.events[-2:] == [("on_step_end", 2), ("on_error", 2)]  # raised at step 3's start


def test_stateful_callbacks_are_saved_and_restored(tmp_path):
    cfg = tiny_config(tmp_path, "run", 6, checkpoint={"interval": 3, "async_save": False})
    first = Counter()
    with pytest.raises(Interrupt):
        Trainer(cfg, callbacks=[first, StopAfter(4)]).train()
    assert first.seen == 4

    again, fresh = Counter(), Record()  # Record has no state: it starts fresh
    Trainer(cfg, callbacks=[again, fresh]).train()
    assert again.at_start == 3  # restored from step 3's checkpoint before on_train_start
    assert again.seen == 6
    assert fresh.events[0] == ("on_train_start", 3)


def test_stateful_callbacks_need_distinct_names(tmp_path):
    with pytest.raises(ValueError, match="distinct names"):
        Trainer(tiny_config(tmp_path, "run", 1), callbacks=[Counter(), Counter()])
