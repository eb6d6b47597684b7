"""Model definitions in plain PyTorch (no parallelism inside)."""

from eurotrain.models.config import ModelConfig, MoEConfig, RopeScaling
from eurotrain.models.llama import IGNORE_INDEX, Transformer, TransformerBlock, build_model

__all__ = [
    "IGNORE_INDEX",
    "MoEConfig",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "TransformerBlock",
    "build_model",
]
