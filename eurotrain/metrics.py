"""Step metrics to stdout (a progress bar on a TTY, plain lines in a batch log), a JSONL file in
the run directory, and wandb (offline by default: compute nodes have no internet).

The run directory and everything in it are writable by their owner only, whatever the umask
(the same modes as checkpoints)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from eurotrain.callbacks import Callback, StepMetrics
from eurotrain.checkpoint.storage import DIR_MODE, FILE_MODE
from eurotrain.configtools import ConfigError
from eurotrain.errors import EurotrainError

if TYPE_CHECKING:
    from eurotrain.train import Trainer, TrainResult

# Dense bf16 peak TFLOP/s per device (vendor datasheets), matched by substring of the device
# name; the first match wins, so more specific names come first ("H100 PCIe" before "H100"; the
# MI300 names share no substring, MI300A is listed first all the same). MareNostrum 5's
# "H100 64GB HBM2" part has no published peak: it matches "H100" and is measured against the
# 80 GB SXM5's 989.4, as the planner's H100 default (plan/hardware.py) and the mn5-acc profile's
# note do. No H100 has a higher peak, so its MFU is a lower bound until train.peak_tflops gives
# a measured peak (the profile leaves it null for that).
PEAK_BF16_TFLOPS = (
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("A100", 312.0),
    ("MI300A", 980.6),
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


def make_run_dir(run_dir: Path, config_yaml: str) -> None:
    """Create the run directory (and its missing parents) and write config.yaml into it, never
    group- or world-writable; an error names the path and the fix."""
    try:
        missing = []
        for d in (run_dir, *run_dir.parents):
            if d.exists() or d.is_symlink():
                break
            missing.append(d)
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):  # another job made it meanwhile
                d.mkdir(mode=DIR_MODE)
                os.chmod(d, DIR_MODE)  # mkdir's mode passes through the umask: make it exact
        with open_private(run_dir / "config.yaml", "w") as f:
            f.write(config_yaml)
    except (FileExistsError, NotADirectoryError):
        blocker = next((d for d in (run_dir, *run_dir.parents) if d.is_file()), run_dir)
        raise ConfigError(
            f"train.output_dir: {str(blocker)!r} is a file, not a directory; choose another "
            f"train.output_dir" + (" or train.run_name" if blocker == run_dir else "")
        ) from None
    except OSError as e:
        raise EurotrainError(
            f"cannot create the run directory {str(run_dir)!r}: {e.strerror or e}; choose a "
            f"writable train.output_dir with free space"
        ) from None


def open_private(path: Path, mode: str) -> Any:
    """open() for a text file ("w" or "a") created and kept at FILE_MODE."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "a" else os.O_TRUNC)
    fd = os.open(path, flags, FILE_MODE)
    os.fchmod(fd, FILE_MODE)  # also tightens a file an older run left
    return os.fdopen(fd, mode, buffering=1)


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Files created meanwhile (by this process and the ones it starts, e.g. wandb's service)
    get at most DIR_MODE / FILE_MODE."""
    old = os.umask(0)
    os.umask(old | (0o777 & ~DIR_MODE))
    try:
        yield
    finally:
        os.umask(old)


def make_private(root: Path) -> None:
    """Directories under ``root`` to DIR_MODE, files to FILE_MODE (for files another library
    wrote under its own rules)."""
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, DIR_MODE)
        for name in filenames:
            with contextlib.suppress(FileNotFoundError):
                path = os.path.join(dirpath, name)
                if not os.path.islink(path):
                    os.chmod(path, FILE_MODE)


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
        self.run_dir = run_dir
        self.bar = cfg.progress == "bar" or (cfg.progress == "auto" and sys.stdout.isatty())
        self.start = time.perf_counter()
        if not enabled or run_dir is None:
            return
        self.file = open_private(run_dir / "metrics.jsonl", "a")
        if cfg.wandb:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            with private_umask():  # wandb's files, and its service process's
                self.wandb_run = wandb.init(
                    project=cfg.wandb_project,
                    mode=cfg.wandb_mode,
                    dir=str(run_dir),
                    name=run_dir.name,
                    config=run_config,
                )

    def drop_after(self, step: int) -> None:
        """Forget the records of steps after ``step`` (records without a step, and earlier
        ones, stay): a run resumed from step's checkpoint logs the later steps again. The file
        is replaced atomically; lines that do not parse (a torn last line after a crash, or
        damage) go too, with a warning that counts them: never a reason to stop a resume."""
        if self.file is None or self.run_dir is None:
            return
        self.file.close()
        path = self.run_dir / "metrics.jsonl"
        kept, dropped = [], 0
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: nested too deeply
                dropped += 1 if line.strip() else 0
                continue
            later = isinstance(record, dict) and type(record.get("step")) is int
            if not (later and record["step"] > step):
                kept.append(line + "\n")
        if dropped:
            self.info(f"warning: {path}: dropped {dropped} line(s) that are not JSON records")
        tmp = path.with_name(".metrics.jsonl.tmp")
        with open_private(tmp, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.file = open_private(path, "a")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:  # numbers only (not the stragglers' list)
            numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            self.wandb_run.log(numbers, step=step)
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
            with private_umask():
                self.wandb_run.finish()
            self.wandb_run = None
            if self.run_dir is not None and (self.run_dir / "wandb").is_dir():
                make_private(self.run_dir / "wandb")


class LogMetrics(Callback):
    """Writes every log step's metrics (and evaluations) through a MetricsLogger."""

    def __init__(self, logger: MetricsLogger) -> None:
        self.logger = logger
        self.last_logged = -1

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.state.step > 0:  # resumed: the steps after the checkpoint run again
            self.logger.drop_after(trainer.state.step)

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
