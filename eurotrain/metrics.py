"""Step metrics to stdout (a progress bar on a TTY, plain lines in a batch log), a JSONL file in
the run directory, and wandb (offline by default: compute nodes have no internet)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from eurotrain.callbacks import Callback, StepMetrics
from eurotrain.configtools import ConfigError

if TYPE_CHECKING:
    from eurotrain.train import Trainer, TrainResult

# Dense bf16 peak TFLOP/s per device (vendor datasheets), matched by substring of the device
# name; the first match wins, so more specific names come first. MN5's "H100 64GB HBM2" part has
# no published peak: set train.peak_tflops from a measurement there.
PEAK_BF16_TFLOPS = (
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("A100", 312.0),
    ("MI300X", 1307.4),
    ("MI250X", 191.5),  # per GCD, as PyTorch sees one
    ("L40S", 362.0),
)


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


@dataclass
class LoggingConfig:
    """Where and how often metrics go."""

    log_interval: int = 1
    """Print and record metrics every this many steps."""
    progress: Literal["auto", "bar", "lines"] = "auto"
    """auto: a progress bar when stdout is a terminal, plain lines otherwise (batch logs)."""
    wandb: bool = False
    """Also log to Weights & Biases, in the mode below."""
    wandb_project: str = "eurotrain"
    """wandb project name."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """offline writes to the run directory; sync later with `wandb sync` from a login node."""

    def __post_init__(self) -> None:
        if self.log_interval < 1:
            raise ConfigError(f"logging.log_interval: {self.log_interval} must be >= 1")


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key == "lr":
            return f"{key} {value:.3e}"
        if key.startswith("tokens_per_s"):
            return f"{key} {value:,.0f}"
        return f"{key} {value:.4g}"
    return f"{key} {value}"


class MetricsLogger:
    """Rank 0 writes; other ranks hold a logger that does nothing."""

    def __init__(
        self,
        cfg: LoggingConfig,
        run_dir: Path | None,
        total_steps: int,
        run_config: dict[str, Any] | None = None,
        enabled: bool = True,
    ) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.total_steps = total_steps
        self.file = None
        self.wandb_run = None
        self.bar = cfg.progress == "bar" or (cfg.progress == "auto" and sys.stdout.isatty())
        self.start = time.perf_counter()
        if not enabled or run_dir is None:
            return
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        if cfg.wandb:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=cfg.wandb_project,
                mode=cfg.wandb_mode,
                dir=str(run_dir),
                name=run_dir.name,
                config=run_config,
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        shown = {k: v for k, v in metrics.items() if k in _SHOWN}
        if self.bar:
            done = step / self.total_steps
            width = 24
            filled = int(done * width)
            elapsed = time.perf_counter() - self.start
            eta = elapsed / done * (1 - done) if done > 0 else math.nan
            line = " | ".join(_fmt(k, v) for k, v in shown.items())
            sys.stdout.write(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total_steps} "
                f"{line} | eta {eta:5.0f}s"
            )
            if step >= self.total_steps:
                sys.stdout.write("\n")
            sys.stdout.flush()
        else:
            line = " | ".join(_fmt(k, v) for k, v in shown.items())
            print(f"step {step}/{self.total_steps} | {line}", flush=True)

    def info(self, message: str) -> None:
        if self.enabled:
            if self.bar:
                sys.stdout.write("\n")
            print(message, flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


class LogMetrics(Callback):
    """Writes every log step's metrics (and evaluations) through a MetricsLogger."""

    def __init__(self, logger: MetricsLogger) -> None:
        self.logger = logger
        self.last_logged = -1

    def _log(self, trainer: Trainer, step: int, metrics: StepMetrics) -> None:
        trainer.sync_metrics()  # a no-op when the loop has synced this step already
        self.logger.log(step, dict(metrics))
        self.last_logged = step

    def on_step_end(self, trainer: Trainer, step: int, metrics: StepMetrics) -> None:
        if trainer.is_log_step(step):
            self._log(trainer, step, metrics)

    def on_eval_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        self.logger.log(step, metrics)

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        last = trainer.last_metrics
        if last is not None and trainer.state.step != self.last_logged:
            self._log(trainer, trainer.state.step, last)
        self.logger.close()

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        self.logger.close()


class Evaluate(Callback):
    """The validation loss every ``interval`` steps (train.eval_interval)."""

    def __init__(self, interval: int) -> None:
        self.interval = interval

    def on_step_end(self, trainer: Trainer, step: int, metrics: StepMetrics) -> None:
        if step % self.interval == 0:
            result = {"val_loss": trainer.evaluate()}
            trainer.callbacks.call("on_eval_end", trainer, step, result)


_SHOWN = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu", "memory_gib")
