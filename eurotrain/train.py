"""The training loop, and ``python -m eurotrain.train CONFIG [--section.key value ...]``.

Trainer builds every component from the config (checking everything that can be wrong before a
model exists); ``train()`` resumes, then runs the loop, and each step is ``train_step()``. Side
concerns (metrics, evaluation, checkpoints, the stop signal, user code) are callbacks on the
named life cycle of eurotrain/callbacks.py; the model runs through an engine
(eurotrain/parallel/engine.py), so the loop has no branch per parallelism or library.

The host waits for the device only at log steps (every ``logging.log_interval`` steps), at
evaluation and at checkpoints: loss, gradient norm and the non-finite flag stay on the device in
between, the token count and the stop flag are agreed on the host (a CPU process group), and
step times come from device events. Loss spikes are caught on the device too (the anomaly
guard's veto skips the update); the host decides what to do about them at log steps.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from eurotrain import chain
from eurotrain.callbacks import CallbackList, StepMetrics
from eurotrain.checkpoint.callback import SaveCheckpoints
from eurotrain.checkpoint.checkpointer import Checkpointer, Resumed, check_sources
from eurotrain.checkpoint.resume import checkpoint_root
from eurotrain.config import Config, load_config
from eurotrain.configtools import ConfigError
from eurotrain.data import Batch, DataPipeline
from eurotrain.distributed import DistInfo, init_distributed
from eurotrain.errors import EurotrainError, run_command, this_rank
from eurotrain.fault import PeerWatch, StopOnSignal
from eurotrain.fault.anomalies import AnomalyGuard
from eurotrain.fault.config import GPU_MTBF_HOURS
from eurotrain.fault.stragglers import Stragglers
from eurotrain.fault.watchdog import HangWatchdog
from eurotrain.gc_schedule import ScheduledGC
from eurotrain.goodput import GoodputRecorder, Ledger
from eurotrain.identity import check_run_dir, config_hash
from eurotrain.metrics import (
    Evaluate,
    LogMetrics,
    MetricsLogger,
    device_peak_tflops,
    make_run_dir,
)
from eurotrain.moe_balance import MoEBalance
from eurotrain.optim import build_scheduler
from eurotrain.parallel.checks import check_compile, check_layout
from eurotrain.parallel.dims import dp_rank_and_size
from eurotrain.parallel.engine import Engine, build_engine
from eurotrain.state import RNGState, Stateful, TrainState

Callback = Any
"""Any object with some of the hooks of eurotrain.callbacks (subclassing Callback is optional)."""


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    run_dir: Path | None = None
    stopped_early: bool = False
    """True when a signal (SLURM's walltime warning, SIGTERM) stopped the run before train.steps."""


class StepTimer:
    """Step durations from device events on GPUs (no host sync until they are read) or the host
    clock on CPUs, read in bulk at log steps."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self.marks.append(self._mark())

    def stop(self) -> None:
        self.marks.append(self._mark())

    def read(self) -> list[float]:
        """Seconds of each step timed since the last read (waits for the last one on a GPU)."""
        pairs = list(zip(self.marks[::2], self.marks[1::2]))
        self.marks = []
        if not self.cuda:
            return [end - start for start, end in pairs]
        if pairs:
            pairs[-1][1].synchronize()
        return [start.elapsed_time(end) / 1000 for start, end in pairs]


def use_deterministic_algorithms() -> None:
    """``train.deterministic``: deterministic kernels only, cuBLAS included.

    cuBLAS matmuls are deterministic only with a fixed workspace configuration; without
    CUBLAS_WORKSPACE_CONFIG, PyTorch's deterministic mode raises at the first CUDA matmul. CUDA
    reads the variable when its runtime initialises, so it is set before any CUDA work, and
    only where the user has not chosen a value (":16:8" also works, using less memory).
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


class Trainer:
    def __init__(self, cfg: Config, callbacks: list[Callback] | None = None) -> None:
        self.cfg = cfg
        if cfg.train.deterministic:
            use_deterministic_algorithms()  # before init_distributed touches the GPU
        self.dist: DistInfo = init_distributed(cfg.train.device, cfg.fault.collective_timeout_s)
        self.ledger = Ledger()
        """Seconds the components spend outside the steps, by kind (eurotrain/goodput.py)."""
        self.host_wait_s = 0.0
        """Seconds this rank waited for the others in the host agreements (stragglers)."""
        torch.manual_seed(cfg.train.seed)

        # Everything that can be wrong with the input is checked before the model exists.
        self.dims = check_layout(cfg, self.dist.world_size)  # layout and batch split
        check_compile(cfg, self.dist.device.type)  # CPU compiling where paths break it
        # prepared sources (their checksums read once, split over the ranks), or raw text
        self.data = DataPipeline(cfg.data, self.dist.rank, self.dist.world_size)
        self.tokenizer = self.data.tokenizer
        self.data.check_model_vocab(cfg.model.vocab_size)
        if cfg.train.eval_interval and not (
            cfg.data.validation_fraction or cfg.data.validation_sources
        ):
            raise ConfigError(
                f"train.eval_interval={cfg.train.eval_interval} needs validation data: set "
                f"data.validation_fraction (e.g. 0.01) or data.validation_sources"
            )

        device = self.dist.device
        world = self.dist.world_size
        # The run directory (its identity check) and the checkpoint to resume from, before any
        # process group beyond the default one, mesh or model exists.
        self.run_dir = self._make_run_dir()
        check_sources(cfg.checkpoint, self.run_dir, world)  # a missing resume path
        self.mesh = self.dims.build_mesh(device.type) if world > 1 else None
        # Host-side agreement (token counts, the stop flag) on the CPU, never through the device.
        self.host_group = None
        if world > 1 and dist.get_backend() != "gloo":
            self.host_group = dist.new_group(backend="gloo")
        dp_rank, dp_size = dp_rank_and_size(self.dims, self.mesh)
        t = cfg.train
        self.loader = self.data.train_loader(
            t.global_batch_size, t.micro_batch_size, dp_rank, dp_size, t.seed
        )
        self.val_loader = self.data.validation_loader(
            t.global_batch_size, t.micro_batch_size, dp_rank, dp_size
        )

        self.engine: Engine = build_engine(cfg, self.dims, self.mesh, device)
        self.scheduler = build_scheduler(self.engine.optimizer, cfg.schedule, cfg.train.steps)
        self.state = TrainState()
        self.rng = RNGState()
        self.peak_tflops = cfg.train.peak_tflops or device_peak_tflops(device)
        self.metrics = MetricsLogger(
            cfg.logging, self.run_dir, cfg.train.steps, cfg.to_dict(), enabled=self.dist.is_main
        )
        self.metrics.info(
            f"eurotrain: {cfg.model.name} ({cfg.model.num_params() / 1e6:.2f}M params) on "
            f"{world} x {device.type} [{self.dims.describe()}], "
            f"{self.engine.precision.compute_dtype}, kernels {_describe_ops(self.model.ops)}, "
            f"run dir {self.run_dir}"
        )
        self.checkpointer = Checkpointer(
            cfg.checkpoint, checkpoint_root(cfg.checkpoint, self.run_dir), self.dist.rank, world,
            cuda=device.type == "cuda", timeout_s=cfg.fault.collective_timeout_s,
            log=self.metrics.info,
        )  # fmt: skip
        self.callbacks = CallbackList(
            [*self._builtin_callbacks(), *(callbacks or [])],
            # The anomaly guard may roll back: after every other callback saw the step. The
            # scheduled collection last: its on_train_start turns automatic collection off after
            # every other on_train_start has run (an error there would leave it off).
            last=[self.anomalies, self._checkpoint_callback(), *self._gc_callback()],
        )

        self.stop_reason: str | None = None
        self.result = TrainResult(run_dir=self.run_dir)
        self.last_metrics: StepMetrics | None = None
        self._timer = StepTimer(device)
        self._unsynced: list[tuple[int, StepMetrics, torch.Tensor, float]] = []
        self._resumed = False

    def _builtin_callbacks(self) -> list[Callback]:
        cfg, rank, world = self.cfg.fault, self.dist.rank, self.dist.world_size
        self.anomalies = AnomalyGuard(cfg, self.cfg.train.max_nonfinite_steps, self.dist.device)
        # Constructed last of the set-up: the start-up ends here.
        self.goodput = GoodputRecorder(self.run_dir, self.ledger, enabled=self.dist.is_main)
        # Names the ranks that stopped answering when a collective fails.
        builtin: list[Callback] = [PeerWatch(rank, world, cfg.collective_timeout_s)]
        if cfg.watchdog:
            builtin.append(HangWatchdog(cfg, rank, world, self.run_dir, self.goodput.abort))
        builtin += [self.goodput, StopOnSignal(self.host_group)]
        if cfg.straggler_margin:
            builtin.append(Stragglers(cfg.straggler_margin, rank, world, self.host_group))
        if self.cfg.model.moe.enabled:  # before LogMetrics: it adds the experts' load
            builtin.append(MoEBalance(self.cfg.model.moe.bias_update_rate))
        builtin += [chain.JobStateReport(self.dist.is_main), LogMetrics(self.metrics)]
        if self.cfg.train.eval_interval:
            builtin.append(Evaluate(self.cfg.train.eval_interval))
        return builtin

    def _gc_callback(self) -> list[ScheduledGC]:
        interval = self.cfg.train.gc_interval
        return [ScheduledGC(interval)] if interval else []

    def _checkpoint_callback(self) -> SaveCheckpoints:
        hours, source = self.cfg.fault.mtbf_hours, "fault.mtbf_hours"
        if not hours:
            world = self.dist.world_size
            hours = GPU_MTBF_HOURS / world
            source = f"{world} devices at Llama 3's rate, one failure per {GPU_MTBF_HOURS:,.0f} h"
        return SaveCheckpoints(self.checkpointer, hours * 3600, source, self.cfg.train.steps)

    # ---- the components, as their owners expose them -------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self.engine.model

    @property
    def model_parts(self) -> list[torch.nn.Module]:
        return self.engine.model_parts

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer

    def checkpoint_parts(self) -> dict[str, Stateful]:
        """Everything a checkpoint keeps, by name (the state contract of eurotrain/state.py)."""
        parts: dict[str, Stateful] = {
            **self.engine.state(),
            "train": self.state,
            "loader": self.loader,
            "scheduler": self.scheduler,
            "rng": self.rng,
        }
        for name, cb in self.callbacks.stateful().items():
            parts[f"callbacks.{name}"] = cb
        return parts

    def run_info(self) -> dict[str, Any]:
        """What a checkpoint's commit marker records besides the state."""
        return {
            "tokens_seen": self.state.tokens_seen,
            "layout": self.dims.degrees(),
            "config_yaml": self.cfg.to_yaml(),
            "config_hash": config_hash(self.cfg.to_dict()),
        }

    # ---- the loop ------------------------------------------------------------------------
    def resume(self) -> Resumed | None:
        """Load the checkpoint that checkpoint.resume / init_from name (once)."""
        if self._resumed:
            return None
        self._resumed = True
        with self.ledger.span("resume"):
            found = self.checkpointer.resume(self.checkpoint_parts())
        if found is not None:
            self.metrics.info(found.describe())
        return found

    def restore(self, path: Path) -> Resumed:
        """Reload the committed checkpoint ``path`` mid-run, on every rank (a rollback): every
        part, and the loop's own bookkeeping of the steps after it."""
        with self.ledger.span("rollback"):
            self.sync_metrics()
            undone = self.state.step
            found = self.checkpointer.load(path, self.checkpoint_parts())
            undone -= self.state.step
            if undone > 0:  # the result keeps each step once, like metrics.jsonl
                kept = max(0, len(self.result.losses) - undone)
                del self.result.losses[kept:], self.result.grad_norms[kept:]
            self._timer.read()
            self.metrics.drop_after(self.state.step)
        return found

    @property
    def finished(self) -> bool:
        return self.state.step >= self.cfg.train.steps or self.stop_reason is not None

    def request_stop(self, reason: str) -> None:
        """End the run after the current step (callbacks call this; every rank must agree)."""
        self.stop_reason = reason

    def is_log_step(self, step: int) -> bool:
        return (
            step % self.cfg.logging.log_interval == 0
            or step == self.cfg.train.steps
            or self.stop_reason is not None
        )

    def train(self) -> TrainResult:
        self.resume()
        self.callbacks.call("on_train_start", self)
        try:
            while not self.finished:
                self.callbacks.call("on_step_start", self, self.state.step + 1)
                metrics = self.train_step(next(self.loader))
                if self.is_log_step(self.state.step):
                    self.sync_metrics()
                self.callbacks.call("on_step_end", self, self.state.step, metrics)
            self.sync_metrics()
        except BaseException as e:
            precise = self.callbacks.call_on_error(self, e)
            if precise is not None:  # e.g. which rank stopped answering in a failed collective
                raise precise from e
            raise
        self.result.stopped_early = self.state.step < self.cfg.train.steps
        self.callbacks.call("on_train_end", self, self.result)
        return self.result

    def train_step(self, batch: Batch) -> StepMetrics:
        """One optimizer step over one global batch. The loss is a sum over tokens divided by
        the token count of the whole global batch, so every rank and micro-batch weighs each
        token equally, as one big batch would."""
        self._timer.start()
        step = self.state.step + 1
        num_tokens = self.global_tokens(batch)
        lr = float(self.scheduler.get_last_lr()[0])
        loss_sum = self.engine.forward_backward(batch, num_tokens)
        loss = self.engine.reduce_loss(loss_sum) / num_tokens
        self.callbacks.call("on_before_optimizer_step", self, step)
        grad_norm, skipped = self.engine.step(self.cfg.train.grad_clip, loss, self.anomalies.veto)
        self.scheduler.step()
        self.state.step = step
        self.state.tokens_seen += int(num_tokens)
        self._timer.stop()
        metrics = StepMetrics(
            {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_seen": self.state.tokens_seen}
        )
        self._unsynced.append((step, metrics, skipped, num_tokens))
        return metrics

    def global_tokens(self, batch: Batch) -> float:
        """Tokens with a label in the whole global batch, counted on the host. Ranks holding the
        same data (tp, cp, pp) each count it: divide by their number."""
        return self._host_sum(float(batch.num_tokens)) / (self.dist.world_size // self.dims.dp)

    def _host_sum(self, value: float) -> float:
        if self.dist.world_size == 1:
            return value
        box = np.array([value], dtype=np.float64)
        start = time.perf_counter()
        dist.all_reduce(torch.from_numpy(box), group=self.host_group)
        self.host_wait_s += time.perf_counter() - start
        return float(box[0])

    def sync_metrics(self) -> None:
        """Bring the steps run since the last sync to the host (one copy): their metrics, the
        result lists, and the steps whose updates the engine skipped (marked ``skipped``; the
        anomaly guard acts on them at the log step)."""
        if not self._unsynced:
            return
        rows = torch.stack(
            [torch.stack([m.raw("loss").float(), m.raw("grad_norm").float(), s.float()])
             for _, m, s, _ in self._unsynced]
        ).tolist()  # fmt: skip
        times = self._timer.read()
        for (_, metrics, _, tokens), (loss, grad_norm, skipped), step_time in zip(
            self._unsynced, rows, times
        ):
            metrics.update(loss=loss, grad_norm=grad_norm, **self._throughput(tokens, step_time))
            self.result.losses.append(loss)
            self.result.grad_norms.append(grad_norm)
            if skipped:
                metrics.update(skipped=True)
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    self.state.nonfinite_steps += 1
        self.last_metrics = self._unsynced[-1][1]
        self._unsynced.clear()

    def _throughput(self, tokens: float, step_time: float) -> dict[str, float]:
        per_device = tokens / step_time / self.dist.world_size
        flops = self.cfg.model.flops_per_token(self.cfg.data.seq_len) * per_device
        out = {
            "tokens_per_s": tokens / step_time,
            "tokens_per_s_per_device": per_device,
            "step_time_s": step_time,
            "tflops_per_device": flops / 1e12,
        }
        if self.peak_tflops:
            out["mfu"] = flops / (self.peak_tflops * 1e12)
        if self.dist.device.type == "cuda":
            out["memory_gib"] = torch.cuda.max_memory_allocated(self.dist.device) / 2**30
        return out

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss per token over the first train.eval_batches validation batches (the same
        batches every time)."""
        assert self.val_loader is not None
        with self.ledger.span("eval"):
            return self._evaluate(self.val_loader)

    def _evaluate(self, val_loader: Any) -> float:
        val_loader.step = 0
        num_batches = min(self.cfg.train.eval_batches, val_loader.batches_per_epoch)
        loss = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        tokens = 0.0
        for _ in range(num_batches):
            batch = next(val_loader)
            loss += self.engine.eval_loss(batch)
            tokens += self.global_tokens(batch)
        return (self.engine.reduce_loss(loss) / tokens).item()

    # ---- set-up helpers ------------------------------------------------------------------
    def _make_run_dir(self) -> Path:
        name = self.cfg.train.run_name
        if not name and os.environ.get("SLURM_JOB_ID"):
            # A requeued SLURM job keeps its id: it finds its own run directory and resumes.
            name = f"{self.cfg.model.name}-job{os.environ['SLURM_JOB_ID']}"
        if not name:
            name = f"{self.cfg.model.name}-{datetime.now():%Y%m%d-%H%M%S}"
        error: Exception | None = None
        if self.dist.is_main:
            run_dir, config = Path(self.cfg.train.output_dir) / name, self.cfg.to_dict()
            try:  # a directory of another run is refused, not resumed
                note = check_run_dir(run_dir, config, self.cfg.checkpoint.allow_config_change)
                make_run_dir(run_dir, self.cfg.to_yaml())
                if note:
                    print(f"eurotrain: {note}", flush=True)
            except EurotrainError as e:
                error = e
        if self.dist.world_size > 1:  # every rank takes rank 0's name (clock) and its error
            box: list[Any] = [name, error]
            dist.broadcast_object_list(box, src=0)
            name, error = box
        if error is not None:
            raise error
        return Path(self.cfg.train.output_dir) / name


def _describe_ops(ops: Any) -> str:
    """ "triton" when every op runs the kernel set asked for, else which op runs what."""
    impls = ops.describe()
    if len(set(impls.values())) == 1:
        return next(iter(impls.values()))
    return ", ".join(f"{op}={impl}" for op, impl in impls.items())


def _log_to_stdout() -> None:
    """Show eurotrain's INFO messages (e.g. which kernel implementation runs) on rank 0."""
    logger = logging.getLogger("eurotrain")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(lambda record: not dist.is_initialized() or dist.get_rank() == 0)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: python -m eurotrain.train CONFIG [--section.key value ...]\n"
            "       (under torchrun --nproc-per-node N for several ranks)"
        )
        return 0 if argv else 2
    _log_to_stdout()

    def run() -> int:
        from eurotrain.distributed import shutdown

        try:
            Trainer(load_config(argv[0], argv[1:])).train()
        except BaseException as e:
            if this_rank() == 0 or not getattr(e, "every_rank", True):
                chain.report_error(e)  # tells a job script whether a restart can help
            raise
        finally:
            shutdown()
        return 0

    return run_command("eurotrain", run)


if __name__ == "__main__":
    sys.exit(main())
