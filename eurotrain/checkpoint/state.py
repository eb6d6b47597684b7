"""What a checkpoint holds, as one DCP state dict built from the parts it is given, and how the
loaded values go back into those parts (eurotrain/state.py describes the parts).

    model.<fqn>            parameters: DTensor shards under FSDP/TP, plain tensors on one rank
    optim.state.<fqn>.*    AdamW moments and step, sharded like their parameter
    optim.param_groups.<fqn>.*   hyper-parameters per parameter (flattened: layout independent)
    train                  JSON text: {"version": 2, "train": {...}, "loader": {...},
                           "scheduler": {...}, "callbacks.<name>": {...}} (every plain-data part)
    rng.rank<R>            every rank's RNG streams: torch (+cuda) as uint8 tensors, python and
                           numpy as JSON text

Everything is keyed by parameter name, never by rank or position, so DCP can load it into any
other layout; only the RNG entries are per rank (a rank without a saved stream keeps its seed).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from eurotrain.errors import CheckpointError
from eurotrain.state import Stateful

TENSOR_PARTS = ("model", "optim")
"""Parts whose state is a tree of (sharded) tensors; DCP stores and reshards them."""
PER_RANK_PARTS = ("rng",)
"""Parts every rank keeps its own copy of."""
JSON_VERSION = 2


def _json_parts(parts: Mapping[str, Stateful]) -> dict[str, Stateful]:
    return {k: v for k, v in parts.items() if k not in TENSOR_PARTS + PER_RANK_PARTS}


def build_state(
    parts: Mapping[str, Stateful], rank: int, *, weights_only: bool = False
) -> dict[str, Any]:
    """The state dict of this rank, referencing live tensors (stage it before mutating)."""
    state: dict[str, Any] = {"model": parts["model"].state_dict()}
    if weights_only:
        return state
    state["optim"] = parts["optim"].state_dict()
    plain = {name: part.state_dict() for name, part in _json_parts(parts).items()}
    state["train"] = json.dumps({"version": JSON_VERSION, **plain})
    if "rng" in parts:
        state[f"rng.rank{rank}"] = parts["rng"].state_dict()
    return state


def load_target(
    parts: Mapping[str, Stateful], rank: int, saved_world: int, keys: set[str]
) -> dict[str, Any]:
    """A state dict shaped like this rank's, for dcp.load to fill in place. ``keys`` are the
    top-level keys present in the checkpoint (a weights-only one has just "model")."""
    state = build_state(parts, rank, weights_only="optim" not in keys)
    if "optim" in keys:
        state["train"] = ""  # DCP replaces non-tensor values with the loaded object
        if rank >= saved_world:
            state.pop(f"rng.rank{rank}", None)
    return state


def _plain_parts(text: str) -> dict[str, Any]:
    data = json.loads(text)
    if "version" not in data:  # format 1: the loop's counters next to loader and schedule
        counters = {k: data[k] for k in ("step", "tokens_seen", "nonfinite_steps")}
        return {"train": counters, "loader": data["loader"], "scheduler": data["scheduler"]}
    data.pop("version")
    return data


def apply_state(parts: Mapping[str, Stateful], state: dict[str, Any], rank: int) -> None:
    """Copy a loaded state dict into the parts: model, optimizer, and (full resumes) the rest."""
    parts["model"].load_state_dict(state["model"])
    if "optim" not in state:
        return
    parts["optim"].load_state_dict(state["optim"])
    saved = _plain_parts(state["train"])
    for name, part in _json_parts(parts).items():
        if name in saved:
            part.load_state_dict(saved[name])
        elif name.startswith("callbacks."):
            # A callback added since the save starts fresh; everything else must be there.
            continue
        else:
            raise CheckpointError(f"the checkpoint holds no state for {name!r}")
    if "rng" in parts and f"rng.rank{rank}" in state:
        parts["rng"].load_state_dict(state[f"rng.rank{rank}"])
