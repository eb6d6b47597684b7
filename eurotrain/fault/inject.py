"""Fault injection for tests: environment variables that make a rank crash, freeze, hang, slow
down, or see a poisoned batch at a chosen point. Unset (always, outside tests), they do nothing.

    EUROTRAIN_TEST_FREEZE="RANK:STEP:HOW[,...]"  after STEP (or "+N": the Nth step of this
        process), that rank sends itself SIGSTOP (HOW=STOP: a frozen process), SIGKILL (KILL: a
        crashed one), or its main thread sleeps for an hour (SLEEP: stuck outside any
        collective, still running)
    EUROTRAIN_TEST_SLOW="RANK:SECONDS"           that rank ('*': every rank) sleeps SECONDS at
        the start of every step (a straggler; a floor under the step time)
    EUROTRAIN_TEST_NAN_BATCH="INDEX[,...]"       the gradients of the step that consumes global
        batch INDEX (0-based, as the data loader counts) become NaN: a poisoned batch
    EUROTRAIN_TEST_ONCE_DIR=DIR                  FREEZE specs fire in order, each once per DIR
        (a marker file there), so a restarted or requeued run goes on to the next one
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

FREEZE_HOOK = "EUROTRAIN_TEST_FREEZE"
SLOW_HOOK = "EUROTRAIN_TEST_SLOW"
NAN_HOOK = "EUROTRAIN_TEST_NAN_BATCH"
ONCE_DIR = "EUROTRAIN_TEST_ONCE_DIR"


def _marker(spec: str) -> str:
    return "fired-" + spec.replace(":", "-").replace("*", "all").replace("+", "p")


def _once(spec: str) -> bool:
    """Whether a spec may fire now (always, unless EUROTRAIN_TEST_ONCE_DIR says it did)."""
    where = os.environ.get(ONCE_DIR)
    if not where:
        return True
    marker = Path(where) / _marker(spec)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    return True


def freeze_for_test(rank: int, step: int, first_step: int) -> None:
    """``first_step``: the first step this process ran (STEP "+N" counts from there). With
    EUROTRAIN_TEST_ONCE_DIR, specs fire in order, each once: a later one waits for the ones
    before it to have fired (in this process or an earlier one)."""
    for spec in filter(None, os.environ.get(FREEZE_HOOK, "").split(",")):
        if spec.count(":") != 2:
            continue
        r, s, how = spec.split(":")
        once = os.environ.get(ONCE_DIR)
        if once and (Path(once) / _marker(spec)).exists():
            continue  # fired already: the next spec may fire
        at = first_step - 1 + int(s[1:]) if s.startswith("+") else int(s)
        if r == str(rank) and step == at and _once(spec):
            if how == "SLEEP":
                time.sleep(3600)
            os.kill(os.getpid(), signal.SIGKILL if how == "KILL" else signal.SIGSTOP)
            if how == "STOP":
                # Woken by SIGCONT: faulthandler's dump may run on another thread a moment
                # later (seen in CI: the main thread had already returned to the loop); stay
                # here meanwhile, so the stacks show where the rank froze.
                time.sleep(2)
        if once:
            return  # in order: this one has not fired yet


def slow_for_test(rank: int) -> None:
    spec = os.environ.get(SLOW_HOOK, "")
    if spec.count(":") == 1:
        r, seconds = spec.split(":")
        if r in ("*", str(rank)):
            time.sleep(float(seconds))


def poisoned_batches() -> set[int]:
    """Global batch indices whose gradients the test hook turns to NaN."""
    return {int(i) for i in os.environ.get(NAN_HOOK, "").split(",") if i.strip()}
