"""Python's garbage collector at fixed steps (train.gc_interval): off between them, the young
generations at each scheduled step, everything every FULL_EVERY of them, and left as found."""

from __future__ import annotations

import gc
import sys
import weakref

import pytest
from checkpoint.ckpt_common import Interrupt, StopAfter, tiny_config

from eurotrain.config import TrainingConfig
from eurotrain.configtools import ConfigError
from eurotrain.gc_schedule import FULL_EVERY, ScheduledGC
from eurotrain.train import Trainer


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


@pytest.fixture
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_young_garbage_goes_at_each_scheduled_step(collector_on):
    sched = ScheduledGC(3)
    sched.on_train_start(None)
    try:
        assert not gc.isenabled()
        garbage = weakref.ref(Node())
        for step in (1, 2):
            sched.on_step_end(None, step, {})
            assert garbage() is not None  # no collection between the scheduled steps
        sched.on_step_end(None, 3, {})
        assert garbage() is None
    finally:
        sched.on_train_end(None, None)
    assert gc.isenabled()


def test_old_garbage_goes_at_the_full_collection(collector_on):
    sched = ScheduledGC(1)
    sched.on_train_start(None)
    try:
        old = Node()
        gc.collect(1)  # it survives into the oldest generation, then becomes garbage there
        garbage = weakref.ref(old)
        del old
        for step in range(1, FULL_EVERY):
            sched.on_step_end(None, step, {})
            if sys.version_info < (3, 14):  # 3.14's incremental collector may take it sooner
                assert garbage() is not None  # generations 0 and 1 only
        sched.on_step_end(None, FULL_EVERY, {})
        assert garbage() is None
    finally:
        sched.on_error(None, RuntimeError("x"))
    assert gc.isenabled()  # restored on an error too


def test_a_collector_turned_off_before_stays_off(collector_on):
    gc.disable()
    sched = ScheduledGC(2)
    sched.on_train_start(None)
    sched.on_train_end(None, None)
    assert not gc.isenabled()


class SeesCollector:
    def __init__(self) -> None:
        self.enabled: list[bool] = []

    def on_step_end(self, trainer, step, metrics):
        self.enabled.append(gc.isenabled())


@pytest.mark.parametrize("interval", [2, 0])
def test_a_run_schedules_the_collector_and_leaves_it_on(tmp_path, collector_on, interval):
    seen = SeesCollector()
    cfg = tiny_config(tmp_path, "run", 3, train={"gc_interval": interval})
    Trainer(cfg, callbacks=[seen]).train()
    assert seen.enabled == [interval == 0] * 3
    assert gc.isenabled()


def test_a_run_that_fails_leaves_the_collector_on(tmp_path, collector_on):
    cfg = tiny_config(tmp_path, "run", 4, train={"gc_interval": 2})
    with pytest.raises(Interrupt):
        Trainer(cfg, callbacks=[StopAfter(1)]).train()
    assert gc.isenabled()


def test_gc_interval_is_checked():
    with pytest.raises(ConfigError, match=r"train\.gc_interval: -1 must be >= 0"):
        TrainingConfig(gc_interval=-1)
