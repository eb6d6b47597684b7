"""Small helpers shared by the kernel files: can Triton run here, row views, log-once.

Kept apart so that the kernel files stay about their math, and so that deciding whether Triton
can run never imports Triton itself (importing it costs a second and may fail on a login node).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

logger = logging.getLogger("eurotrain.kernels")

_logged: set[str] = set()


def log_once(message: str) -> None:
    """Log ``message`` at INFO the first time it is seen in this process.

    The fallback decision is made per call; logging it every step would flood the run log.
    """
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


def reset_log_once() -> None:
    """Forget what was logged (for tests that check the message appears)."""
    _logged.clear()


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    """True when ``import triton`` works. Cached: the answer cannot change within a process."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install (missing libcuda shim, ...) counts as absent
        return False
    return True


def interpret_mode() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``).

    Triton reads this variable when a kernel is decorated, so it must be set before the kernel
    files are imported; the tests' conftest does that.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable() -> str | None:
    """None when Triton kernels can run in this process, else the reason they cannot."""
    if not triton_importable():
        return "triton is not importable"
    if not (torch.cuda.is_available() or interpret_mode()):
        return "no GPU is visible and TRITON_INTERPRET is not 1"
    return None


def can_run_triton(t: torch.Tensor) -> bool:
    """True when a Triton kernel can take ``t``: a GPU tensor, or any tensor in interpret mode."""
    return triton_importable() and (t.is_cuda or interpret_mode())


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` as [rows, last dim] with unit stride along the last dim.

    Views are kept where possible (a [B, S, D] slice of a wider tensor keeps its row stride and
    is not copied); only a tensor whose last dim is strided is made contiguous.
    """
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def num_programs_for_rows(device: torch.device, num_rows: int) -> int:
    """How many programs share the rows of a row-reduction (RMSNorm's weight gradient).

    One per SM on a GPU so every SM has work; few on the interpreter, where each program runs
    serially on the host. Fixed per device, so the reduction order (and result) is too.
    """
    if device.type == "cuda":
        count = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        count = 4
    return max(1, min(num_rows, count))


def num_warps_for_block(block: int) -> int:
    """A common heuristic: more warps for wider rows so each thread holds a bounded slice."""
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4
