"""Layouts whose predicted memory the tests compare with a real step's (tests/plan)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
BASE = [
    "--train.device", "cpu",
    "--data.seq_len", "64",
    "--model.max_seq_len", "64",
]  # fmt: skip


def load(overrides: list[str]) -> Any:
    from eurotrain.config import load_config

    return load_config(TINY, [*BASE, *overrides])


def measure_cases(rank: int, world_size: int, cases: list[list[str]]) -> list[dict[str, int]]:
    """Each case's measured bytes on this rank, in one process group (reused)."""
    from memtrace import measure_step

    return [measure_step(load(overrides), world_size) for overrides in cases]
