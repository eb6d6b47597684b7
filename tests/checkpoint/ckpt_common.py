"""Shared pieces of the checkpoint tests: a small config and the per-rank training functions
that run_distributed executes in real gloo processes."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from eurotrain.config import Config, config_from_dict


def tiny_config(out: Path, run: str, steps: int, **sections: dict[str, Any]) -> Config:
    """The tiny model on a small slice of the demo corpus: fast enough for 4 ranks on 2 cores."""
    data: dict[str, Any] = {
        "model": {
            "name": "tiny", "vocab_size": 320, "dim": 64, "num_layers": 2, "num_heads": 4,
            "num_kv_heads": 2, "ffn_dim": 192, "max_seq_len": 64,
        },
        "data": {"corpus": "demo", "tokenizer": "byte", "seq_len": 32, "demo_bytes": 200_000},
        "train": {
            "steps": steps, "global_batch_size": 8, "micro_batch_size": 2, "device": "cpu",
            "output_dir": str(out), "run_name": run,
        },
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 2},
        "logging": {"log_interval": 1},
    }  # fmt: skip
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data)


def train_run(rank: int, world: int, out: str, run: str, steps: int, sections: dict) -> list:
    """Build a Trainer (resuming per sections['checkpoint']) and train; returns the losses."""
    from eurotrain.train import Trainer

    trainer = Trainer(tiny_config(Path(out), run, steps, **sections))
    return trainer.train().losses


class Interrupt(Exception):
    pass


class StopAfter:
    """Records losses, and ends the run with an exception once a step is over (its callbacks,
    a checkpoint of it included, have run), as a crash before the next step would."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.losses: list[float] = []

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        self.losses.append(metrics["loss"])

    def on_step_start(self, trainer: Any, step: int) -> None:
        if step == self.step + 1:
            raise Interrupt(f"stopped after step {self.step}")


def straight_and_saved(rank: int, world: int, out: str) -> tuple[list, list]:
    """10 steps straight; then a fresh 10-step trainer with checkpoint.interval 5 that is
    interrupted right after step 5 (its async save of step 5 still commits)."""
    from eurotrain.train import Trainer

    straight = train_run(rank, world, out, "straight", 10, {})
    trainer = Trainer(tiny_config(Path(out), "split", 10, checkpoint={"interval": 5}))
    stop = StopAfter(5)
    trainer.callbacks.append(stop)  # raises once step 5 (and the start of its save) is over
    with contextlib.suppress(Interrupt):
        trainer.train()
    return straight, stop.losses


def save_dp4_then_hsdp(rank: int, world: int, out: str) -> tuple[list, list]:
    """Train 3 steps under dp_shard=4 saving at step 2; then, in the same 4 processes, resume
    step 2 under HSDP (dp_replicate=2 x dp_shard=2) and train step 3."""
    saved = train_run(rank, world, out, "dp4", 3, {"checkpoint": {"interval": 2}})
    hsdp = resume_run(rank, world, out, "hsdp", {"dp_replicate": 2, "dp_shard": 2})
    return saved, hsdp


def resume_run(rank: int, world: int, out: str, run: str, parallel: dict) -> list:
    """Resume the dp_shard=4 run's step-2 checkpoint under another layout; train step 3."""
    ckpt = str(Path(out) / "dp4" / "checkpoints" / "step-000002")
    sections = {"parallel": parallel, "checkpoint": {"resume": ckpt, "verify": "full"}}
    return train_run(rank, world, out, run, 3, sections)


def attempts(rank: int, world: int, out: str, runs: list[tuple[str, int, dict]]) -> list[dict]:
    """Build a Trainer for each (run, steps, sections) in turn and train it; per run the step
    it started from, its losses and rank 0's log, or the CheckpointError this rank raised."""
    import io
    from contextlib import redirect_stdout

    from eurotrain.checkpoint import CheckpointError
    from eurotrain.train import Trainer

    results = []
    for run, steps, sections in runs:
        log = io.StringIO()
        try:
            with redirect_stdout(log):
                trainer = Trainer(tiny_config(Path(out), run, steps, **sections))
                trainer.resume()
                start = trainer.state.step
                losses = trainer.train().losses
        except CheckpointError as e:
            results.append({"error": str(e), "log": log.getvalue()})
            continue
        results.append({"start": start, "losses": losses, "log": log.getvalue()})
    return results


def ddp_round_trip(rank: int, world: int, out: str) -> tuple[list, list, list]:
    """Replicas only (DDP): resume the dp_shard=4 run's step 2 under it; then a DDP run saves
    step 2 and FSDP (dp_shard=2) resumes it."""
    ddp = {"dp_replicate": 2, "dp_shard": 1}
    from_fsdp = resume_run(rank, world, out, "ddp", ddp)
    saved = train_run(
        rank, world, out, "ddp-save", 3, {"parallel": ddp, "checkpoint": {"interval": 2}}
    )
    ckpt = str(Path(out) / "ddp-save" / "checkpoints" / "step-000002")
    sections = {"parallel": {"dp_shard": 2}, "checkpoint": {"resume": ckpt}}
    to_fsdp = train_run(rank, world, out, "from-ddp", 3, sections)
    return from_fsdp, saved, to_fsdp
