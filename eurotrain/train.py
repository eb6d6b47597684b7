"""The training loop, and ``python -m eurotrain.train CONFIG [--section.key value ...]``.

Trainer builds every component from the config (checking everything that can be wrong before a
model exists), then train() runs the loop; one step is train_step(), which reads top to bottom.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
import torch.distributed as dist

from eurotrain.checkpoint import Checkpointer
from eurotrain.config import Config, load_config
from eurotrain.configtools import ConfigError
from eurotrain.data import Batch, DataPipeline
from eurotrain.distributed import DistInfo, init_distributed
from eurotrain.errors import EurotrainError, NonFiniteLossError, run_command
from eurotrain.fault import PeerWatch, StopRequest
from eurotrain.metrics import MetricsLogger, device_peak_tflops, make_run_dir
from eurotrain.models import IGNORE_INDEX
from eurotrain.optim import build_optimizer, build_scheduler
from eurotrain.parallel import cp as context_parallel
from eurotrain.parallel.checks import check_layout, pipeline_microbatches
from eurotrain.parallel.deepspeed import build_deepspeed
from eurotrain.parallel.dims import dp_rank_and_size
from eurotrain.parallel.grad import clip_grad_norm_
from eurotrain.parallel.parallelize import build_parallel_model, uses_fsdp
from eurotrain.parallel.tp import loss_context, plain, sharded_cross_entropy

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule


class Callback(Protocol):
    """Side concerns (checkpoints, profiling, custom logging) hook in here, not in the loop."""

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    run_dir: Path | None = None
    stopped_early: bool = False
    """True when a signal (SLURM's walltime warning, SIGTERM) stopped the run before train.steps."""


class Trainer:
    def __init__(self, cfg: Config, callbacks: list[Callback] | None = None) -> None:
        self.cfg = cfg
        self.callbacks = list(callbacks or [])
        self.dist: DistInfo = init_distributed(cfg.train.device, cfg.fault.collective_timeout_s)
        # Names the ranks that stopped answering when a collective fails (tracks the step).
        self.peers = PeerWatch(self.dist.rank, self.dist.world_size, cfg.fault.collective_timeout_s)
        self.callbacks.append(self.peers)
        torch.manual_seed(cfg.train.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)

        # Everything that can be wrong with the input is checked before the model exists.
        self.dims = check_layout(cfg, self.dist.world_size)  # layout and batch split
        self.data = DataPipeline(cfg.data)  # prepared sources, or the raw-text corpus
        self.tokenizer = self.data.tokenizer
        if self.data.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"the tokenizer {self.data.identity['name']!r} has {self.data.vocab_size} tokens "
                f"but model.vocab_size is {cfg.model.vocab_size}: set model.vocab_size to at "
                f"least {self.data.vocab_size} (a multiple of 64 is fastest)"
            )
        if cfg.train.eval_interval and not (
            cfg.data.validation_fraction or cfg.data.validation_sources
        ):
            raise ConfigError(
                f"train.eval_interval={cfg.train.eval_interval} needs validation data: set "
                f"data.validation_fraction (e.g. 0.01) or data.validation_sources"
            )

        device_type = self.dist.device.type
        self.mesh = self.dims.build_mesh(device_type) if self.dist.world_size > 1 else None
        dp_rank, dp_size = dp_rank_and_size(self.dims, self.mesh)
        t = cfg.train
        self.loader = self.data.train_loader(
            t.global_batch_size, t.micro_batch_size, dp_rank, dp_size, t.seed
        )
        self.val_loader = self.data.validation_loader(
            t.global_batch_size, t.micro_batch_size, dp_rank, dp_size
        )

        self.run_dir = self._make_run_dir()
        bf16 = cfg.train.mixed_precision == "bf16" or (
            cfg.train.mixed_precision == "auto" and device_type == "cuda"
        )
        self.compute_dtype = torch.bfloat16 if bf16 else torch.float32
        self.sharded = uses_fsdp(self.dims, self.mesh, cfg.parallel)
        built = build_parallel_model(
            cfg.model,
            cfg.parallel,
            self.dims,
            self.mesh,
            self.dist.device,
            self.compute_dtype,
            cfg.train.seed,
            pipeline_microbatches(cfg, self.dims) if self.dims.pp > 1 else 1,
        )
        # One module per pipeline stage this rank holds; a single one without pipelining.
        # self.model is the whole model, or under pipelining a view of this rank's stages with
        # the whole model's parameter names (what checkpoints save and load).
        self.model_parts = built.parts
        self.pipeline = built.pipeline
        self.model = built.model
        self.optimizer = build_optimizer(
            torch.nn.ModuleList(self.model_parts), cfg.optim, device_type
        )
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.train.steps)
        self.deepspeed = None
        if cfg.parallel.engine == "deepspeed":
            self.deepspeed = build_deepspeed(cfg, self.model, self.optimizer, dp_size, bf16)
        model = self.model
        self.step = 0
        self.stop_request = StopRequest()
        self.stop_agreed = False
        self.nonfinite_steps = 0
        self.tokens_seen = 0
        self.peak_tflops = cfg.train.peak_tflops or device_peak_tflops(self.dist.device)
        self.metrics = MetricsLogger(
            cfg.logging,
            self.run_dir,
            cfg.train.steps,
            cfg.to_dict(),
            enabled=self.dist.is_main,
        )
        self.metrics.info(
            f"eurotrain: {cfg.model.name} ({cfg.model.num_params() / 1e6:.2f}M params) on "
            f"{self.dist.world_size} x {self.dist.device.type} [{self.dims.describe()}], "
            f"{self.compute_dtype}, kernels {_describe_ops(model.ops)}, run dir {self.run_dir}"
        )
        # Resume (or init_from) once model, optimizer, schedule and loader exist; saves are a
        # callback, the final one happens in train().
        self.checkpointer = Checkpointer(cfg.checkpoint, self)
        if self.checkpointer.maybe_resume(self) and self.step > 0:
            self.metrics.drop_after(self.step)  # the steps after the checkpoint run again
        self.callbacks.append(self.checkpointer)

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
            try:
                make_run_dir(Path(self.cfg.train.output_dir) / name, self.cfg.to_yaml())
            except EurotrainError as e:
                error = e
        if self.dist.world_size > 1:  # every rank takes rank 0's name (clock) and its error
            box: list[Any] = [name, error]
            dist.broadcast_object_list(box, src=0)
            name, error = box
        if error is not None:
            raise error
        return Path(self.cfg.train.output_dir) / name

    def _autocast(self):
        if (
            self.dist.device.type == "cuda"
            and self.compute_dtype != torch.float32
            and not self.sharded
        ):
            return torch.autocast("cuda", dtype=self.compute_dtype)
        return contextlib.nullcontext()

    def _all_reduce(self, t: torch.Tensor, *axes: str) -> torch.Tensor:
        """Sum ``t`` over all ranks, or over the named mesh axes only (ranks on the other axes
        hold copies, not parts)."""
        if not axes:
            if self.dist.world_size > 1:
                dist.all_reduce(t)
            return t
        for axis in axes:
            if self.mesh is not None and self.mesh[axis].size() > 1:
                dist.all_reduce(t, group=self.mesh[axis].get_group())
        return t

    def _loss(self, model, x: torch.Tensor, y: torch.Tensor, positions=None) -> torch.Tensor:
        """Summed CE of one micro-batch; under tp computed on the vocabulary shards."""
        if self.dims.tp > 1:
            return sharded_cross_entropy(model(x, positions=positions), y)
        return model(x, y, positions=positions)

    def _forward_backward(self, batch: Batch, num_tokens: torch.Tensor) -> torch.Tensor:
        """Forward and backward of every micro-batch (gradient accumulation); the summed CE."""
        device = self.dist.device
        loss_sum = torch.zeros((), device=device)
        num_micro = len(batch.inputs)
        for i, (x, y) in enumerate(zip(batch.inputs, batch.labels)):
            if self.sharded:  # reduce-scatter gradients only after the last micro-batch
                cast("FSDPModule", self.model).set_requires_gradient_sync(i == num_micro - 1)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            positions: torch.Tensor | None = None
            ring: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            if self.dims.cp > 1:  # this rank's slice of every sequence
                assert self.mesh is not None  # cp > 1 means several ranks
                cp_mesh = self.mesh["cp"]
                if self.cfg.parallel.cp_method == "ulysses":
                    x, y, positions = context_parallel.shard_sequence(x, y, cp_mesh)
                else:
                    positions = torch.arange(x.shape[1], device=device)
                    ring = context_parallel.ring_context(cp_mesh, x, y, positions)
            with ring, loss_context(self.dims.tp):
                with self._autocast():
                    loss = self._loss(self.deepspeed or self.model, x, y, positions)
                if self.deepspeed is not None:
                    self.deepspeed.backward_and_step(loss / num_tokens)
                else:
                    (loss / num_tokens).backward()
            loss_sum += plain(loss.detach()).float()
        return loss_sum

    def _pipeline_step(self, batch: Batch, num_tokens: torch.Tensor) -> torch.Tensor:
        """The schedule runs forward and backward of all micro-batches over the stages; the
        summed CE of the last stage (zero on the other pipeline ranks)."""
        assert self.pipeline is not None
        device = self.dist.device
        x = torch.cat(batch.inputs).to(device)
        y = torch.cat(batch.labels).to(device)
        with loss_context(self.dims.tp), self._autocast():
            return self.pipeline.step(x, y, num_tokens)

    # ---- the loop ------------------------------------------------------------------------
    def train(self) -> TrainResult:
        result = TrainResult(run_dir=self.run_dir)
        finished = False
        try:
            with self.stop_request, self.peers:
                while self.step < self.cfg.train.steps:
                    metrics = self.train_step(next(self.loader))
                    result.losses.append(metrics["loss"])
                    result.grad_norms.append(metrics["grad_norm"])
                    if (
                        self.cfg.train.eval_interval
                        and self.step % self.cfg.train.eval_interval == 0
                    ):
                        metrics["val_loss"] = self.evaluate()
                    for cb in self.callbacks:
                        cb.on_step_end(self, self.step, metrics)
                    if self.stop_agreed:
                        result.stopped_early = True
                        here = self.stop_request.signal_name
                        self.metrics.info(
                            f"eurotrain: stop requested ({here or 'a signal on another rank'}): "
                            f"stopping after step {self.step} of {self.cfg.train.steps} with a "
                            f"final checkpoint; resubmit the same job to resume"
                        )
                        break
            finished = True
        finally:
            self.checkpointer.close(self, final_save=finished)
            self.metrics.close()
        return result

    def train_step(self, batch: Batch) -> dict[str, Any]:
        start = time.perf_counter()
        for part in self.model_parts:
            part.train()
        device = self.dist.device
        # The loss is a sum over tokens divided by the token count of the whole global batch,
        # so every rank and micro-batch weighs each token equally, as one big batch would.
        local_tokens = sum(int((y != IGNORE_INDEX).sum()) for y in batch.labels)
        # One collective carries the token count and whether any rank was asked to stop. Ranks
        # with the same data (tp, cp, pp) each count it once: divide by their number.
        counts = torch.tensor(
            [float(local_tokens), float(self.stop_request.requested)], device=device
        )
        total, stop = self._all_reduce(counts).unbind()
        num_tokens = total / (self.dist.world_size // self.dims.dp)
        self.stop_agreed = bool(stop.item() > 0)
        lr = cast(float, self.scheduler.get_last_lr()[0])  # a float: optim.lr is no tensor
        if self.pipeline is not None:
            loss_sum = self._pipeline_step(batch, num_tokens)
        else:
            loss_sum = self._forward_backward(batch, num_tokens)
        # Each token's loss lives on one (data, context) rank of the last pipeline stage.
        loss = (self._all_reduce(loss_sum, "dp_cp", "pp") / num_tokens).item()

        if self.deepspeed is not None:  # DeepSpeed has clipped and stepped already
            grad_norm = torch.tensor(self.deepspeed.grad_norm())
            if not math.isfinite(loss):
                self._skip_nonfinite(loss, grad_norm.item())
        else:
            params = [p for part in self.model_parts for p in part.parameters()]
            pp_group = None
            if self.dims.pp > 1:
                assert self.mesh is not None  # pp > 1 means several ranks
                pp_group = self.mesh["pp"].get_group()
            grad_norm = clip_grad_norm_(params, self.cfg.train.grad_clip, pp_group)
            if not (math.isfinite(loss) and math.isfinite(grad_norm.item())):
                self._skip_nonfinite(loss, grad_norm.item())
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += int(num_tokens.item())

        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_time = time.perf_counter() - start
        metrics = self._step_metrics(loss, lr, grad_norm.item(), num_tokens.item(), step_time)
        if self.step % self.cfg.logging.log_interval == 0 or self.step == self.cfg.train.steps:
            self.metrics.log(self.step, metrics)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss per token over the first train.eval_batches validation batches (the same
        batches every time), logged as val_loss."""
        assert self.val_loader is not None
        self.model.eval()
        self.val_loader.step = 0
        num_batches = min(self.cfg.train.eval_batches, self.val_loader.batches_per_epoch)
        totals = torch.zeros(2, dtype=torch.float64, device=self.dist.device)
        for _ in range(num_batches):
            batch = next(self.val_loader)
            for x, y in zip(batch.inputs, batch.labels):
                x, y = x.to(self.dist.device), y.to(self.dist.device)
                with self._autocast(), loss_context(self.dims.tp):
                    model = self.deepspeed or self.model
                    totals[0] += plain(self._loss(model, x, y)).double()
                totals[1] += int((y != IGNORE_INDEX).sum())
        val_loss = (self._all_reduce(totals, "dp")[0] / totals[1]).item()
        self.metrics.log(self.step, {"val_loss": val_loss})
        return val_loss

    def _skip_nonfinite(self, loss: float, grad_norm: float) -> None:
        self.nonfinite_steps += 1
        message = (
            f"step {self.step + 1}: loss {loss} / grad norm {grad_norm} is not finite "
            f"({self.nonfinite_steps} such steps so far, train.max_nonfinite_steps = "
            f"{self.cfg.train.max_nonfinite_steps})"
        )
        if self.nonfinite_steps > self.cfg.train.max_nonfinite_steps:
            raise NonFiniteLossError(
                message + ": stopping. Lower optim.lr, raise schedule.warmup_steps, check the "
                "data, or resume from the last checkpoint."
            )
        self.metrics.info(message + ": the update is skipped")

    def _step_metrics(
        self, loss: float, lr: float, grad_norm: float, tokens: float, step_time: float
    ) -> dict[str, Any]:
        per_device = tokens / step_time / self.dist.world_size
        metrics: dict[str, Any] = {
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / step_time,
            "tokens_per_s_per_device": per_device,
            "step_time_s": step_time,
            "tokens_seen": self.tokens_seen,
        }
        flops = self.cfg.model.flops_per_token(self.cfg.data.seq_len) * per_device
        metrics["tflops_per_device"] = flops / 1e12
        if self.peak_tflops:
            metrics["mfu"] = flops / (self.peak_tflops * 1e12)
        if self.dist.device.type == "cuda":
            metrics["memory_gib"] = torch.cuda.max_memory_allocated(self.dist.device) / 2**30
        return metrics


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
        finally:
            shutdown()
        return 0

    return run_command("eurotrain", run)


if __name__ == "__main__":
    sys.exit(main())
