"""Model definitions in plain PyTorch (no parallelism inside)."""

from eurotrain.models.config import ModelConfig, RopeScaling
from eurotrain.models.llama import IGNORE_INDEX, Transformer, TransformerBlock, build_model

__all__ = [
    "IGNORE_INDEX",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "TransformerBlock",
    "build_model",
]
