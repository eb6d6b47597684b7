"""Kernel tests run on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before Triton decorates any kernel, i.e. before the kernel files
are imported; conftest runs before the test modules, so it is set here. Set
TRITON_INTERPRET=0 on a GPU machine to run the same tests compiled, on CUDA/ROCm tensors.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    """CPU under the interpreter; the GPU when the tests are run compiled on one."""
    if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
