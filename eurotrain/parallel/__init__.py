"""Parallelism applied from outside the model, on one DeviceMesh."""

from __future__ import annotations

from typing import TYPE_CHECKING

from eurotrain._lazy import lazy_exports

if TYPE_CHECKING:
    from eurotrain.parallel.checks import check_layout
    from eurotrain.parallel.config import ParallelConfig
    from eurotrain.parallel.dims import ParallelDims
    from eurotrain.parallel.fsdp import apply_fsdp
    from eurotrain.parallel.parallelize import build_parallel_model, parallelize

_EXPORTS = {
    "check_layout": "eurotrain.parallel.checks",
    "ParallelConfig": "eurotrain.parallel.config",
    "ParallelDims": "eurotrain.parallel.dims",
    "apply_fsdp": "eurotrain.parallel.fsdp",
    "build_parallel_model": "eurotrain.parallel.parallelize",
    "parallelize": "eurotrain.parallel.parallelize",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = [
    "ParallelConfig",
    "ParallelDims",
    "apply_fsdp",
    "build_parallel_model",
    "check_layout",
    "parallelize",
]
