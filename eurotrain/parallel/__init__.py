"""Parallelism applied from outside the model, on one DeviceMesh."""

from eurotrain.parallel.checks import check_layout
from eurotrain.parallel.config import ParallelConfig
from eurotrain.parallel.dims import ParallelDims
from eurotrain.parallel.fsdp import apply_fsdp
from eurotrain.parallel.parallelize import build_parallel_model, parallelize

__all__ = [
    "ParallelConfig",
    "ParallelDims",
    "apply_fsdp",
    "build_parallel_model",
    "check_layout",
    "parallelize",
]
