"""Checkpoints through torch.distributed.checkpoint: sharded, async, atomic, reshardable."""

from __future__ import annotations

from typing import TYPE_CHECKING

from eurotrain._lazy import lazy_exports

if TYPE_CHECKING:
    from eurotrain.checkpoint.checkpointer import Checkpointer
    from eurotrain.checkpoint.config import CheckpointConfig
    from eurotrain.checkpoint.directory import CheckpointError

_EXPORTS = {
    "Checkpointer": "eurotrain.checkpoint.checkpointer",
    "CheckpointConfig": "eurotrain.checkpoint.config",
    "CheckpointError": "eurotrain.checkpoint.directory",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = ["CheckpointConfig", "CheckpointError", "Checkpointer"]
