"""eurotrain: pretrain Llama-family language models on EuroHPC GPU supercomputers.

The public API: the config tree and its loader, the model builder, the trainer. Everything else
may change between versions. Names are imported on first use, so ``import eurotrain`` is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from eurotrain._lazy import lazy_exports

if TYPE_CHECKING:
    from eurotrain.config import (
        CheckpointConfig,
        Config,
        TrainingConfig,
        config_from_dict,
        load_config,
    )
    from eurotrain.data import DataConfig, load_tokenizer
    from eurotrain.errors import CheckpointError, ConfigError, EurotrainError, NonFiniteLossError
    from eurotrain.metrics import LoggingConfig
    from eurotrain.models import ModelConfig, Transformer, build_model
    from eurotrain.optim import OptimConfig, ScheduleConfig
    from eurotrain.parallel import ParallelConfig, ParallelDims
    from eurotrain.train import Callback, Trainer, TrainResult

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointConfig": "eurotrain.config",
    "Config": "eurotrain.config",
    "TrainingConfig": "eurotrain.config",
    "config_from_dict": "eurotrain.config",
    "load_config": "eurotrain.config",
    "CheckpointError": "eurotrain.errors",
    "ConfigError": "eurotrain.errors",
    "EurotrainError": "eurotrain.errors",
    "NonFiniteLossError": "eurotrain.errors",
    "DataConfig": "eurotrain.data",
    "load_tokenizer": "eurotrain.data",
    "LoggingConfig": "eurotrain.metrics",
    "ModelConfig": "eurotrain.models",
    "Transformer": "eurotrain.models",
    "build_model": "eurotrain.models",
    "OptimConfig": "eurotrain.optim",
    "ScheduleConfig": "eurotrain.optim",
    "ParallelConfig": "eurotrain.parallel",
    "ParallelDims": "eurotrain.parallel",
    "Callback": "eurotrain.train",
    "Trainer": "eurotrain.train",
    "TrainResult": "eurotrain.train",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = [
    "Callback",
    "CheckpointConfig",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataConfig",
    "EurotrainError",
    "LoggingConfig",
    "ModelConfig",
    "NonFiniteLossError",
    "OptimConfig",
    "ParallelConfig",
    "ParallelDims",
    "ScheduleConfig",
    "TrainResult",
    "Trainer",
    "TrainingConfig",
    "Transformer",
    "build_model",
    "config_from_dict",
    "load_config",
    "load_tokenizer",
]
