"""The root config tree and how it is loaded: YAML file, then dotted CLI overrides, validated."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from eurotrain.checkpoint.config import CheckpointConfig
from eurotrain.configtools import (
    ConfigError,
    divisors,
    from_dict,
    merge,
    parse_overrides,
    read_yaml,
    shown,
    to_dict,
)
from eurotrain.data.config import DataConfig
from eurotrain.fault import FaultConfig
from eurotrain.metrics import LoggingConfig
from eurotrain.models.config import ModelConfig
from eurotrain.optim import OptimConfig, ScheduleConfig
from eurotrain.parallel.config import ParallelConfig
from eurotrain.parallel.float8 import Float8Config


@dataclass
class TrainingConfig:
    """The loop: length, batch, precision, reproducibility, output."""

    steps: int = 100
    """Optimizer steps to run."""
    global_batch_size: int = 16
    """Sequences per optimizer step, over all data-parallel ranks and accumulation steps."""
    micro_batch_size: int = 8
    """Sequences per rank per forward pass; the rest of the batch is gradient accumulation."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still logged)."""
    seed: int = 0
    """Seeds weights (layout-independent) and the data order; 0 <= seed < 2**63 (numpy refuses
    negative seeds, torch ones beyond 64 bits)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: the local GPU when there is one, else the CPU."""
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 compute with fp32 master weights and reductions on GPU, fp32 on CPU. bf16:
    bf16 compute on any device (on a CPU under autocast: the GPU path's numerics, slowly)."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms (slower; for debugging numerics); also sets
    CUBLAS_WORKSPACE_CONFIG=:4096:8 unless set, which cuBLAS needs to be deterministic."""
    output_dir: str = "runs"
    """Parent directory of run directories."""
    run_name: str = ""
    """Run directory name under output_dir; empty means '<model.name>-job<SLURM_JOB_ID>' inside a
    SLURM job (a requeued job resumes from its own checkpoints), else '<model.name>-<date>-<time>'."""
    peak_tflops: float | None = None
    """Per-device bf16 peak for MFU, > 0; null means looked up from the GPU's name."""
    max_nonfinite_steps: int = 0
    """Non-finite losses tolerated (the step is skipped) before the run stops with an error."""
    eval_interval: int = 0
    """Compute the validation loss (val_loss) every this many steps; 0 disables it. Needs
    data.validation_fraction or data.validation_sources."""
    eval_batches: int = 10
    """Global batches of validation data per evaluation (the same ones every time)."""
    gc_interval: int = 50
    """Python's garbage collector runs every this many steps, on every rank at the same step,
    instead of whenever allocations trigger it (a pause on one rank stalls all the others at the
    next collective); 0 leaves it automatic. eurotrain/gc_schedule.py."""

    def __post_init__(self) -> None:
        for key in ("steps", "global_batch_size", "micro_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: {getattr(self, key)} must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size ({self.global_batch_size}) is not a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size}); for example set "
                f"train.micro_batch_size to one of "
                f"{divisors(self.global_batch_size)}"
            )
        if self.eval_interval < 0 or self.eval_batches < 1:
            raise ConfigError(
                f"train.eval_interval ({self.eval_interval}) must be >= 0 (0 = off) and "
                f"train.eval_batches ({self.eval_batches}) >= 1"
            )
        if self.gc_interval < 0:
            raise ConfigError(
                f"train.gc_interval: {self.gc_interval} must be >= 0 (0 = Python's automatic "
                "garbage collection)"
            )
        if not self.grad_clip >= 0:  # written so that nan fails too
            raise ConfigError(f"train.grad_clip: {self.grad_clip} must be >= 0 (0 = off)")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(
                f"train.seed: {shown(self.seed)} must be between 0 and 2**63 - 1 (any such "
                f"integer; the default is 0)"
            )
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(
                f"train.peak_tflops: {self.peak_tflops} must be > 0 (the device's bf16 peak in "
                f"TFLOP/s), or null to look it up from the GPU's name"
            )


@dataclass
class Config:
    """Everything one training run needs; written resolved to every run directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    float8: Float8Config = field(default_factory=Float8Config)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self) -> None:
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len "
                f"({self.model.max_seq_len}): shorten the sequences or raise max_seq_len"
            )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def config_from_dict(data: dict[str, Any]) -> Config:
    return from_dict(Config, data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when path is None) and apply ``--a.b value`` overrides."""
    data = read_yaml(path) if path is not None else {}
    if overrides:
        data = merge(data, parse_overrides(overrides))
    return config_from_dict(data)
