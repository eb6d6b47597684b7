from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tests run single-threaded per process: several ranks share 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Triton kernels run through the CPU interpreter (read when kernels are decorated).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs two workers; README, Development): the tests that
    use the test SLURM share one cluster (and the machine's one munged), so they run on one
    worker, in one group; that group and the other long tests go first, so neither worker is
    left with a long test at the end."""
    for item in items:
        if "slurm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("slurm"))
    if not config.getoption("numprocesses", None):
        return
    first = ("test_bundle_installs_offline_and_trains",)

    def rank(item) -> int:
        if "slurm" in getattr(item, "fixturenames", ()):
            return 0
        return 1 if item.name in first else 2

    items.sort(key=rank)  # stable: the order within each rank is collection's
