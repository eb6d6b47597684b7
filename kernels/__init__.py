"""Fused kernels for the Llama step, each with a plain PyTorch reference of the same signature.

This package never imports the rest of eurotrain. ``get_ops(name)`` returns the set of ops the
model calls: ``"torch"`` (the references), ``"triton"`` (fused Triton kernels; falls back to the
references where Triton or a GPU is missing) or ``"compile"`` (the references under
``torch.compile``). ``Ops.describe()`` says which implementation each op resolved to.

Importing this package imports neither Triton nor ``torch._dynamo``: both are loaded the first
time ``get_ops`` asks for them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from eurotrain.kernels import reference
from eurotrain.kernels._runtime import can_run_triton, log_once, triton_usable

KERNEL_CHOICES = ("torch", "triton", "compile")
OP_NAMES = ("rms_norm", "apply_rotary", "swiglu", "linear_cross_entropy")


@dataclass(frozen=True)
class Ops:
    """The ops the model calls, and which implementation each resolved to.

    ``backend`` is the kernel set that actually runs: "torch", "triton" or "compile" ("torch"
    when "triton" was asked for but could not run). ``impls`` maps each op to its
    implementation, e.g. {"rms_norm": "triton", "linear_cross_entropy": "torch-chunked"}.
    """

    rms_norm: Callable
    apply_rotary: Callable
    swiglu: Callable
    linear_cross_entropy: Callable
    backend: str
    impls: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, str]:
        """{op name: implementation} for logs and run metadata."""
        return {name: self.impls.get(name, self.backend) for name in OP_NAMES}


def _with_fallback(name: str, triton_fn: Callable, reference_fn: Callable) -> Callable:
    """Run ``triton_fn`` when its first tensor argument can go to Triton, else the reference.

    get_ops decides once for the process; this guard covers CPU tensors on a GPU machine
    (e.g. a unit test or a CPU eval) and logs, once, that the reference ran instead.
    """

    def op(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if any(_is_dtensor(a) for a in (x, *args)):
            # Sequence-parallel inputs and replicated norm weights are DTensors: the kernels take
            # local tensors, and unwrapping them would drop the weight gradient's reduction over
            # the tensor-parallel ranks. The reference runs through DTensor's own dispatch.
            log_once(f"eurotrain.kernels: {name} got DTensor inputs; using the PyTorch reference")
            return reference_fn(x, *args, **kwargs)
        if can_run_triton(x):
            return triton_fn(x, *args, **kwargs)
        log_once(
            f"eurotrain.kernels: {name} got a {x.device.type} tensor; using the PyTorch reference"
        )
        return reference_fn(x, *args, **kwargs)

    op.__name__ = name
    op.__doc__ = triton_fn.__doc__
    return op


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor"  # no import of torch.distributed for a plain run


class _LazyCompiled:
    """``torch.compile(fn)`` made on the first call, so get_ops("compile") stays cheap."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.compiled: Callable | None = None
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            self.compiled = torch.compile(self.fn)
        return self.compiled(*args, **kwargs)


def _triton_ops() -> Ops:
    reason = triton_usable()
    if reason is not None:
        from eurotrain.kernels.cross_entropy import linear_cross_entropy as chunked_ce

        impls = {name: "torch" for name in OP_NAMES}
        impls["linear_cross_entropy"] = "torch-chunked"
        log_once(
            f"eurotrain.kernels: 'triton' kernels requested but {reason}; using the PyTorch "
            "references, and the chunked (memory-saving) PyTorch linear_cross_entropy"
        )
        return Ops(
            rms_norm=reference.rms_norm,
            apply_rotary=reference.apply_rotary,
            swiglu=reference.swiglu,
            linear_cross_entropy=chunked_ce,
            backend="torch",
            impls=impls,
        )

    from eurotrain.kernels.cross_entropy import linear_cross_entropy as chunked_ce
    from eurotrain.kernels.rmsnorm import rms_norm
    from eurotrain.kernels.rope import apply_rotary
    from eurotrain.kernels.swiglu import swiglu

    log_once("eurotrain.kernels: using the Triton kernels")
    return Ops(
        rms_norm=_with_fallback("rms_norm", rms_norm, reference.rms_norm),
        apply_rotary=_with_fallback("apply_rotary", apply_rotary, reference.apply_rotary),
        swiglu=_with_fallback("swiglu", swiglu, reference.swiglu),
        # Chooses Triton or torch per chunk itself; chunked (never the full logits) either way.
        linear_cross_entropy=chunked_ce,
        backend="triton",
        impls={name: "triton" for name in OP_NAMES},
    )


def get_ops(name: str = "torch") -> Ops:
    """The kernel set ``name`` ("torch" | "triton" | "compile"), set by ``model.kernels``."""
    if name not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernel set {name!r}; choose one of {', '.join(KERNEL_CHOICES)}")
    if name == "triton":
        return _triton_ops()
    if name == "compile":
        return Ops(
            rms_norm=_LazyCompiled(reference.rms_norm),
            apply_rotary=_LazyCompiled(reference.apply_rotary),
            swiglu=_LazyCompiled(reference.swiglu),
            linear_cross_entropy=_LazyCompiled(reference.linear_cross_entropy),
            backend="compile",
            impls={op: "compile" for op in OP_NAMES},
        )
    return Ops(
        rms_norm=reference.rms_norm,
        apply_rotary=reference.apply_rotary,
        swiglu=reference.swiglu,
        linear_cross_entropy=reference.linear_cross_entropy,
        backend="torch",
        impls={op: "torch" for op in OP_NAMES},
    )
