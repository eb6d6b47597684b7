"""Layouts whose predicted memory the tests compare with a real step's (tests/plan)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
TINY_MOE = str(REPO / "configs" / "tiny-moe.yaml")
BASE = [
    "--train.device", "cpu",
    "--data.seq_len", "64",
    "--model.max_seq_len", "64",
]  # fmt: skip


def load(overrides: list[str]) -> Any:
    """tiny.yaml with ``overrides``, or the config a ``.yaml`` first word names."""
    from eurotrain.config import load_config

    config = TINY
    if overrides and overrides[0].endswith(".yaml"):
        config, overrides = overrides[0], overrides[1:]
    return load_config(config, [*BASE, *overrides])


def measure_cases(
    rank: int, world_size: int, cases: list[list[str]], single: list[list[str]] | None = None
) -> list[dict[str, int]]:
    """Each case's measured bytes on this rank, in one process group (reused); then each of
    ``single`` as a one-process run (no mesh: every rank runs it alone, in parallel)."""
    from memtrace import measure_step

    out = [measure_step(load(overrides), world_size) for overrides in cases]
    return out + [measure_step(load(overrides), 1) for overrides in single or []]
