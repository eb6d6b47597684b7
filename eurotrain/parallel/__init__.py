"""Parallelism applied from outside the model, on one DeviceMesh."""

from eurotrain.parallel.config import ParallelConfig
from eurotrain.parallel.dims import ParallelDims
from eurotrain.parallel.fsdp import apply_fsdp
from eurotrain.parallel.parallelize import parallelize

__all__ = ["ParallelConfig", "ParallelDims", "apply_fsdp", "parallelize"]
