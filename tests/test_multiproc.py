"""The multi-process harness fails fast on a rank that dies or hangs, instead of waiting forever."""

from __future__ import annotations

import os
import time

import pytest
from multiproc import run_distributed


def _rank1_dies(rank: int, world_size: int) -> int:
    if rank == 1:
        os._exit(3)  # as a crash in native code would: no exception, no report
    return rank


def _rank1_hangs(rank: int, world_size: int) -> int:
    if rank == 1:
        time.sleep(60)
    return rank


def test_a_dead_rank_fails_the_test_at_once() -> None:
    start = time.monotonic()
    with pytest.raises(AssertionError, match="rank 1 exited with code 3 without reporting"):
        run_distributed(_rank1_dies, 2)
    assert time.monotonic() - start < 60


def test_a_hung_rank_fails_after_the_timeout() -> None:
    # 8 s: time for rank 0 to start, join and report on a loaded machine (ranks start in the
    # timeout), while rank 1 sleeps well past it
    with pytest.raises(AssertionError, match=r"ranks \[1\] did not report within 8 s"):
        run_distributed(_rank1_hangs, 2, timeout=8)
