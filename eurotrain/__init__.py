"""eurotrain: pretrain Llama-family language models on EuroHPC GPU supercomputers.

The public API: the config tree and its loader, the model builder, the trainer. Everything else
may change between versions.
"""

from eurotrain.config import CheckpointConfig, Config, TrainingConfig, config_from_dict, load_config
from eurotrain.configtools import ConfigError
from eurotrain.data import DataConfig, load_tokenizer
from eurotrain.metrics import LoggingConfig
from eurotrain.models import ModelConfig, Transformer, build_model
from eurotrain.optim import OptimConfig, ScheduleConfig
from eurotrain.parallel import ParallelConfig, ParallelDims
from eurotrain.train import Callback, Trainer, TrainResult

__version__ = "0.1.0"

__all__ = [
    "Callback",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
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
