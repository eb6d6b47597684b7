"""Non-finite and spiking steps: skip the update, roll back past the data, or stop.

Two halves, so that no step waits for the host:

- On the device, every step: ``SpikeDetector.veto`` compares the loss (and the gradient norm)
  with a running mean and variance (an exponential average over ``fault.spike_window`` steps)
  and returns a flag; the engine skips the update when it is set or the loss or norm is not
  finite (fused AdamW's ``found_inf``). Steps it skips do not enter the statistics.
- On the host, at log steps (when the trainer reads the metrics anyway): ``AnomalyGuard`` looks
  at the steps since the last log step and applies ``fault.anomaly_policy``: skip (go on; too
  many non-finite steps stop the run), stop, or rollback: reload the newest committed
  checkpoint from before the first bad step on every rank, move the data past the window that
  led to it (from the checkpoint's data position through the last bad step's batch), record the
  window in RUN_DIR/skipped_windows.json and go on. A resumed run skips the recorded windows too,
  so it sees the data a run that never met them would have seen after them.

A rollback is decided at log steps: with ``logging.log_interval`` k, up to k - 1 steps after
the bad one run before it (their updates are not skipped, but they are undone by the rollback).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from eurotrain.callbacks import Callback, StepMetrics
from eurotrain.checkpoint import directory
from eurotrain.errors import CheckpointError, NonFiniteLossError, unreadable
from eurotrain.fault.config import FaultConfig
from eurotrain.fault.inject import poisoned_batches

if TYPE_CHECKING:
    from eurotrain.train import Trainer

WINDOWS_FILE = "skipped_windows.json"


class SpikeDetector:
    """Running statistics of the loss and the gradient norm on the device, and the spike flag."""

    def __init__(self, cfg: FaultConfig, device: torch.device) -> None:
        self.loss_z, self.grad_z = cfg.spike_zscore, cfg.grad_spike_zscore
        self.window = cfg.spike_window
        self.alpha = 2.0 / (cfg.spike_window + 1)
        # count, loss mean, loss variance, norm mean, norm variance
        self.stats = torch.zeros(5, dtype=torch.float64, device=device)

    @torch.no_grad()
    def veto(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
        x = loss.detach().to(torch.float64).reshape(())
        g = x if grad_norm is None else grad_norm.detach().to(torch.float64).reshape(())
        count = self.stats[0]
        finite = torch.isfinite(x) & torch.isfinite(g)
        warm = count >= self.window
        spike = torch.zeros((), dtype=torch.bool, device=x.device)
        for value, index, threshold in ((x, 1, self.loss_z), (g, 3, self.grad_z)):
            if threshold and not (index == 3 and grad_norm is None):
                mean, var = self.stats[index], self.stats[index + 1]
                # A floor under the deviation: a flat curve must not make noise a spike.
                std = torch.maximum(var.clamp_min(0).sqrt(), 0.01 * mean.abs() + 1e-12)
                spike = spike | (warm & ((value - mean) / std > threshold))
        spike = spike & finite
        accept = finite & ~spike
        alpha = torch.where(count == 0, 1.0, self.alpha)
        new = self.stats.clone()
        for value, index in ((x, 1), (g, 3)):
            delta = value - self.stats[index]
            new[index] = self.stats[index] + alpha * delta
            new[index + 1] = (1 - alpha) * (self.stats[index + 1] + alpha * delta * delta)
        new[0] = count + 1
        self.stats.copy_(torch.where(accept, new, self.stats))
        return spike

    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats.tolist()}  # read at checkpoints only

    def load_state_dict(self, state: dict[str, Any]) -> None:
        values = [float(v) for v in state["stats"]]
        if len(values) != 5:
            raise ValueError(f"spike statistics: expected 5 numbers, got {len(values)}")
        self.stats.copy_(torch.tensor(values, dtype=torch.float64))


class AnomalyGuard(Callback):
    """fault.anomaly_policy at log steps, the skipped data windows, and the spike statistics
    (saved with checkpoints as callbacks.anomalies). The trainer passes ``veto`` to the
    engine when spike detection is on."""

    name = "anomalies"

    def __init__(self, cfg: FaultConfig, max_nonfinite: int, device: torch.device) -> None:
        self.cfg, self.max_nonfinite = cfg, max_nonfinite
        self.detector = SpikeDetector(cfg, device)
        self.windows: list[dict[str, Any]] = []
        self.pending: list[tuple[int, int, StepMetrics]] = []
        """(step, batch index, metrics) of the steps since the last log step."""
        self._poisoned = poisoned_batches()

    @property
    def veto(self) -> Any:
        return self.detector.veto if self.cfg.detects_spikes else None

    def state_dict(self) -> dict[str, Any]:
        return self.detector.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state)

    # ---- the life cycle ------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer) -> None:
        self.windows = _agree(read_windows(trainer.run_dir), trainer)

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        moved = True
        while moved:  # windows may touch
            moved = False
            for w in self.windows:
                if w["start"] <= trainer.loader.step < w["end"]:
                    trainer.loader.step = w["end"]
                    moved = True

    def on_before_optimizer_step(self, trainer: Trainer, step: int) -> None:
        if self._poisoned and trainer.loader.step - 1 in self._poisoned:  # a test's bad batch
            for part in trainer.model_parts:
                for p in part.parameters():
                    if p.grad is not None:
                        p.grad.fill_(float("nan"))

    def on_step_end(self, trainer: Trainer, step: int, metrics: StepMetrics) -> None:
        self.pending.append((step, trainer.loader.step - 1, metrics))
        if not trainer.is_log_step(step):
            return
        pending, self.pending = self.pending, []
        bad = [(s, b, m) for s, b, m in pending if m.get("skipped")]
        if bad:
            self._act(trainer, bad)

    # ---- the policy ----------------------------------------------------------------------
    def _describe(self, step: int, m: StepMetrics) -> str:
        loss, norm = m["loss"], m["grad_norm"]
        if math.isfinite(loss) and math.isfinite(norm):
            return f"step {step}: loss {loss:.4g} / grad norm {norm:.4g} is a spike"
        return f"step {step}: loss {loss} / grad norm {norm} is not finite"

    def _act(self, trainer: Trainer, bad: list[tuple[int, int, StepMetrics]]) -> None:
        first, _, m = bad[0]
        what = self._describe(first, m) + (f" ({len(bad)} such steps)" if len(bad) > 1 else "")
        nonfinite = any("not finite" in self._describe(s, mm) for s, _, mm in bad)
        policy = self.cfg.anomaly_policy
        if policy == "rollback":
            self._roll_back(trainer, bad, what)
            return
        count = trainer.state.nonfinite_steps
        limit = self.max_nonfinite
        if policy == "stop" or (nonfinite and count > limit):
            raise NonFiniteLossError(
                f"{what} ({count} non-finite steps so far, train.max_nonfinite_steps = {limit}, "
                f"fault.anomaly_policy {policy}): stopping. Lower optim.lr, raise "
                f"schedule.warmup_steps, check the data, set fault.anomaly_policy rollback, or "
                f"resume from the last checkpoint."
            )
        trainer.metrics.info(f"eurotrain: {what}: the update was skipped")

    def _roll_back(
        self, trainer: Trainer, bad: list[tuple[int, int, StepMetrics]], what: str
    ) -> None:
        done, limit = len(self.windows), self.cfg.max_rollbacks
        if done >= limit:
            raise NonFiniteLossError(
                f"{what}: {done} rollbacks done already (fault.max_rollbacks = {limit}): "
                f"stopping. Look at the data in RUN_DIR/{WINDOWS_FILE} and the loss curve; raise "
                f"fault.max_rollbacks or lower optim.lr, then resume"
            )
        first = bad[0][0]
        target = _agree(_checkpoint_before(trainer.checkpointer, first), trainer)
        if target is None:
            raise NonFiniteLossError(
                f"{what}: no committed checkpoint from before step {first} to roll back to "
                f"(checkpoint.interval {trainer.cfg.checkpoint.interval}, keep_last "
                f"{trainer.cfg.checkpoint.keep_last}): stopping; save more often"
            )
        resumed = trainer.restore(Path(target))
        start, end = trainer.loader.step, bad[-1][1] + 1
        window = {"start": start, "end": end, "step": first, "rolled_back_to": resumed.step,
                  "reason": what}  # fmt: skip
        self.windows.append(window)
        if trainer.dist.is_main:
            write_windows(trainer.run_dir, self.windows)
            for found in directory.scan(trainer.checkpointer.root):
                if found.step > resumed.step:  # saved on the abandoned path
                    directory.remove_checkpoint(found.path)
        trainer.loader.step = end
        trainer.metrics.info(
            f"eurotrain: {what}: rolled back to {Path(target).name} (step {resumed.step}) and "
            f"skipping batches {start}..{end - 1} ({end - start} batches, recorded in "
            f"{trainer.run_dir / WINDOWS_FILE}); rollback {done + 1} of fault.max_rollbacks "
            f"{limit}"
        )


def _checkpoint_before(checkpointer: Any, step: int) -> str | None:
    """The newest committed checkpoint of a step before ``step`` (rank 0 looks)."""
    if checkpointer.rank != 0:
        return None
    checkpointer.wait()
    good = [f for f in directory.scan(checkpointer.root) if not f.problem and f.step < step]
    return str(good[-1].path) if good else None


def _agree(value: Any, trainer: Trainer) -> Any:
    """Rank 0's value on every rank (over the host group)."""
    if trainer.dist.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=trainer.host_group)
    return box[0]


def read_windows(run_dir: Path) -> list[dict[str, Any]]:
    """The skipped windows recorded in the run directory (validated: written by us, but read
    as any file a user hands us)."""
    path = run_dir / WINDOWS_FILE
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        windows = data["windows"]
        for w in windows:
            if not (
                type(w["start"]) is int and type(w["end"]) is int and 0 <= w["start"] < w["end"]
            ):
                raise ValueError(f"bad window {w!r:.80}")
        return [dict(w) for w in windows]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(
            f"{path}: unreadable list of skipped data windows ({unreadable(e)}); fix or remove it (a "
            f"removed file means those batches are trained on again)"
        ) from None


def write_windows(run_dir: Path, windows: list[dict[str, Any]]) -> None:
    from eurotrain.metrics import open_private

    path = run_dir / WINDOWS_FILE
    tmp = path.with_name(path.name + ".tmp")
    with open_private(tmp, "w") as f:
        f.write(json.dumps({"windows": windows}, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
