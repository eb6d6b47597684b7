"""What a checkpoint holds, as one DCP state dict, and how it goes back into a trainer.

    model.<fqn>            parameters: DTensor shards under FSDP/TP, plain tensors on one rank
    optim.state.<fqn>.*    AdamW moments and step, sharded like their parameter
    optim.param_groups.<fqn>.*   hyper-parameters per parameter (flattened: layout independent)
    train                  JSON text: step, tokens seen, non-finite count, loader, LR schedule
    rng.rank<R>            every rank's RNG streams: torch (+cuda) as uint8 tensors, python and
                           numpy as JSON text

Everything is keyed by parameter name, never by rank or position, so DCP can load it into any
other layout; only the RNG entries are per rank (a rank without a saved stream keeps its seed).
"""

from __future__ import annotations

import json
import random
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

# Sharded (no gather) and with the optimizer's param_groups flattened per parameter name, so
# pipeline stages holding different parameters never collide on one key.
OPTIONS = StateDictOptions(full_state_dict=False, flatten_optimizer_state_dict=True)


def rng_state() -> dict[str, Any]:
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


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    meta = json.loads(state["meta"])
    version, words, gauss = meta["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def train_state(trainer: Any) -> str:
    return json.dumps(
        {
            "step": trainer.step,
            "tokens_seen": trainer.tokens_seen,
            "nonfinite_steps": trainer.nonfinite_steps,
            "loader": trainer.loader.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
        }
    )


def build_state(trainer: Any, rank: int, *, weights_only: bool = False) -> dict[str, Any]:
    """The state dict of this rank, referencing live tensors (stage it before mutating)."""
    model: nn.Module = trainer.model
    state: dict[str, Any] = {"model": get_model_state_dict(model, options=OPTIONS)}
    if weights_only:
        return state
    state["optim"] = get_optimizer_state_dict(model, trainer.optimizer, options=OPTIONS)
    state["train"] = train_state(trainer)
    state[f"rng.rank{rank}"] = rng_state()
    return state


def load_target(trainer: Any, rank: int, saved_world: int, keys: set[str]) -> dict[str, Any]:
    """A state dict shaped like this rank's, for dcp.load to fill in place. ``keys`` are the
    top-level keys present in the checkpoint (a weights-only one has just "model")."""
    state = build_state(trainer, rank, weights_only="optim" not in keys)
    if "optim" in keys:
        state["train"] = ""  # DCP replaces non-tensor values with the loaded object
        if rank >= saved_world:
            del state[f"rng.rank{rank}"]
    return state


def apply_state(trainer: Any, state: dict[str, Any], rank: int) -> None:
    """Copy a loaded state dict into the trainer's model, optimizer, schedule, loader, RNG."""
    set_model_state_dict(trainer.model, state["model"], options=OPTIONS)
    if "optim" not in state:
        return
    set_optimizer_state_dict(trainer.model, trainer.optimizer, state["optim"], options=OPTIONS)
    train = json.loads(state["train"])
    trainer.step = int(train["step"])
    trainer.tokens_seen = int(train["tokens_seen"])
    trainer.nonfinite_steps = int(train["nonfinite_steps"])
    trainer.loader.load_state_dict(train["loader"])
    trainer.scheduler.load_state_dict(train["scheduler"])
    if f"rng.rank{rank}" in state:
        set_rng_state(state[f"rng.rank{rank}"])
