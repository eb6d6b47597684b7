"""MFU's peak: the dense bf16 peak looked up from the device's name (eurotrain/metrics.py)."""

from __future__ import annotations

import pytest
import torch

from eurotrain.metrics import device_peak_tflops


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 64GB HBM2", 989.4),  # MareNostrum 5: no published peak, the SXM5's figure
        ("NVIDIA GH200 480GB", 989.4),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-64GB", 312.0),
        ("AMD Instinct MI300A", 980.6),
        ("AMD Instinct MI300X", 1307.4),
        ("AMD Instinct MI250X", 191.5),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA GeForce RTX 4090", None),  # unknown: no MFU unless train.peak_tflops
    ],
)
def test_peak_by_device_name(monkeypatch, name: str, peak: float | None) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert device_peak_tflops(torch.device("cuda", 0)) == peak


def test_no_peak_on_a_cpu() -> None:
    assert device_peak_tflops(torch.device("cpu")) is None
