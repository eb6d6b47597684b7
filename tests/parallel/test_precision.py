"""The run's precision policy (parallel/engine.py, Precision): who casts to bf16, and where."""

from __future__ import annotations

import pytest
import torch

from eurotrain.parallel.engine import Precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("mixed_precision", "device", "casts_itself", "dtype", "autocast"),
    [
        ("auto", CUDA, False, torch.bfloat16, True),  # one GPU: autocast
        ("auto", CUDA, True, torch.bfloat16, False),  # FSDP2 casts the parameters
        ("fp32", CUDA, False, torch.float32, False),
        ("auto", CPU, False, torch.float32, False),  # CPUs compute in fp32 by default
        ("bf16", CPU, False, torch.bfloat16, True),  # asked for by name: the GPU path's numerics
        ("bf16", CPU, True, torch.bfloat16, False),
    ],
)
def test_resolve(mixed_precision, device, casts_itself, dtype, autocast) -> None:
    precision = Precision.resolve(mixed_precision, device, casts_itself)
    assert (precision.compute_dtype, precision.autocast) == (dtype, autocast)
    assert precision.device_type == device.type


def test_bf16_on_a_cpu_runs_the_matmuls_in_bf16() -> None:
    linear = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with Precision.resolve("bf16", CPU, casts_itself=False).context():
        assert linear(x).dtype == torch.bfloat16
    with Precision.resolve("auto", CPU, casts_itself=False).context():
        assert linear(x).dtype == torch.float32
