"""Checkpoints through torch.distributed.checkpoint: sharded, async, atomic, reshardable."""

from __future__ import annotations

from eurotrain.checkpoint.checkpointer import Checkpointer
from eurotrain.checkpoint.config import CheckpointConfig
from eurotrain.checkpoint.layout import CheckpointError

__all__ = ["CheckpointConfig", "CheckpointError", "Checkpointer"]
