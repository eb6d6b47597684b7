"""Which run a run directory belongs to: a hash of the config keys that define the run.

A job that finds a run directory written before (a requeued or restarted job, a resubmission)
resumes it. If the keys that define the run changed since (the model, the data, the optimizer
and schedule, the batch, the seed: everything outside ``MAY_CHANGE``), the directory belongs to
another run: the job stops with the differences named, instead of resuming it silently, unless
``checkpoint.allow_config_change`` says the change is deliberate.

May change on resume: the length (train.steps), where things go (output_dir, run_name, device),
measurement and logging, evaluation, the parallel layout (checkpoints reshard), checkpointing
and fault handling, and train.micro_batch_size (gradient accumulation gives the same step).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from eurotrain.errors import ConfigError
from eurotrain.safe_yaml import load_yaml

MAY_CHANGE_SECTIONS = ("parallel", "checkpoint", "logging", "fault")
MAY_CHANGE_KEYS = (
    "train.steps", "train.output_dir", "train.run_name", "train.device", "train.peak_tflops",
    "train.eval_interval", "train.eval_batches", "train.max_nonfinite_steps",
    "train.micro_batch_size", "train.deterministic",
)  # fmt: skip
FILE = "run.json"


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def defining(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened keys that define the run."""
    return {
        k: v
        for k, v in _flat(config).items()
        if k.split(".")[0] not in MAY_CHANGE_SECTIONS and k not in MAY_CHANGE_KEYS
    }


def config_hash(config: dict[str, Any]) -> str:
    text = json.dumps(defining(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_run_dir(run_dir: Path, config: dict[str, Any], allow_change: bool) -> str | None:
    """Raise ConfigError when run_dir holds another run (its config.yaml defines a different
    run); returns a note to log when a change was allowed, else None."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        before = load_yaml(path.read_text(), str(path))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"{path}: unreadable ({e}); this run directory cannot be checked: choose another "
            f"train.run_name or remove the directory"
        ) from None
    if not isinstance(before, dict) or config_hash(before) == config_hash(config):
        return None
    old, new = defining(before), defining(config)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
    more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
    if allow_change:
        return f"run directory {run_dir}: config changed ({shown}{more}), allowed by config"
    raise ConfigError(
        f"run directory {run_dir} was written by another run (config hash "
        f"{config_hash(before)}, this config {config_hash(config)}; {shown}{more}): it is not "
        f"resumed. Choose another train.run_name (or train.output_dir) for a new run, restore "
        f"the config to resume it, or set checkpoint.allow_config_change true if the change "
        f"is deliberate"
    )


def write_identity(run_dir: Path, config: dict[str, Any]) -> None:
    from eurotrain.metrics import open_private

    with open_private(run_dir / FILE, "w") as f:
        f.write(json.dumps({"config_hash": config_hash(config)}) + "\n")
