"""The state contract: whatever holds state across a restart exposes ``state_dict()`` and
``load_state_dict()``, and the checkpointer saves the parts it is given, by name.

The trainer's parts: ``model`` and ``optim`` (the engine's, sharded tensors), ``train`` (this
module's TrainState), ``loader`` (the data position), ``scheduler`` (the LR schedule), ``rng`` (this
rank's random streams) and ``callbacks.<name>`` for stateful callbacks. Every part but model and
optim is plain JSON data, apart from RNG tensors.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol, cast, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """The loop's own counters."""

    step: int = 0
    """Optimizer steps done."""
    tokens_seen: int = 0
    """Training tokens consumed (labels that count in the loss), over all ranks."""
    nonfinite_steps: int = 0
    """Steps whose update was skipped because the loss or gradient norm was not finite."""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            setattr(self, f.name, int(state[f.name]))


class RNGState:
    """This process's random streams: torch (and CUDA), Python's random, NumPy's legacy one."""

    def state_dict(self) -> dict[str, Any]:
        version, words, gauss = random.getstate()
        # legacy=True (the default) gives the tuple form, not the dict numpy's stubs also allow
        np_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = np_state
        meta = {
            "python": [version, list(words), gauss],
            "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        }
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "meta": json.dumps(meta)}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        meta = json.loads(state["meta"])
        version, words, gauss = meta["python"]
        random.setstate((version, tuple(words), gauss))
        name, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
