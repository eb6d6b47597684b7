"""The engine: how this rank runs the model, behind one interface, so the training loop has no
branch per parallelism or per library.

    forward_backward(batch, num_tokens) -> this rank's summed token cross-entropy (on the device)
    reduce_loss(loss_sum)               -> the global sum over the ranks that hold different tokens
    step(max_norm, loss, veto)          -> (grad norm, skipped): clip, then the optimizer update,
                                           skipped on the device when loss or norm is not finite
                                           or veto(loss, norm) (a device flag: a spike) is set
    eval_loss(batch)                    -> summed cross-entropy without gradients
    state()                             -> {"model": Stateful, "optim": Stateful} for checkpoints

TorchEngine is PyTorch's own stack (one process, DDP for replicas only, FSDP2/HSDP, TP + SP,
pipelining, context parallelism). DeepSpeedEngine (eurotrain/parallel/deepspeed.py) runs ZeRO stages 1-3 behind the
same calls. ``build_engine`` picks one from ``parallel.engine``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh

from eurotrain.configtools import ConfigError
from eurotrain.models.attention import document_ids
from eurotrain.models.moe import moe_layers, set_aux_loss_scale
from eurotrain.optim import build_optimizer
from eurotrain.parallel import cp as context_parallel
from eurotrain.parallel.checks import pipeline_microbatches
from eurotrain.parallel.dims import ParallelDims
from eurotrain.parallel.float8 import check_float8, precompute_scales
from eurotrain.parallel.grad import clip_grad_norm_
from eurotrain.parallel.parallelize import build_parallel_model, uses_ddp, uses_fsdp

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

    from eurotrain.config import Config
    from eurotrain.data import Batch
    from eurotrain.state import Stateful

Veto = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""veto(loss, grad norm or None) -> a device bool: skip this update too (a loss spike). Called
once per step, before the update; it must not read the device from the host."""

# Sharded (no gather) and with the optimizer's param_groups flattened per parameter name, so
# pipeline stages holding different parameters never collide on one key, and a checkpoint loads
# into any other layout.
STATE_OPTIONS = StateDictOptions(full_state_dict=False, flatten_optimizer_state_dict=True)


@dataclass(frozen=True)
class Precision:
    """The one place the run's numerics are decided."""

    compute_dtype: torch.dtype
    """Matmul dtype: bf16 on GPUs (auto), fp32 on CPUs unless bf16 is asked for by name; master
    weights are always fp32."""
    autocast: bool
    """Autocast around the forward in bf16, unless FSDP2 casts the parameters itself: on a GPU,
    and on a CPU asked for bf16 (so a CPU run can check the GPU path's numerics: the GPU
    suite's smoke run)."""
    device_type: str

    @classmethod
    def resolve(cls, mixed_precision: str, device: torch.device, casts_itself: bool) -> Precision:
        bf16 = mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")
        dtype = torch.bfloat16 if bf16 else torch.float32
        autocast = bf16 and not casts_itself
        return cls(dtype, autocast, device.type)

    def context(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast:
            return torch.autocast(self.device_type, dtype=self.compute_dtype)
        return contextlib.nullcontext()


class Engine(Protocol):
    model: nn.Module
    """The whole model, or under pipelining one module over this rank's stages with the whole
    model's parameter names."""
    model_parts: list[nn.Module]
    optimizer: torch.optim.Optimizer
    precision: Precision

    def forward_backward(self, batch: Batch, num_tokens: float) -> torch.Tensor: ...
    def reduce_loss(self, loss_sum: torch.Tensor) -> torch.Tensor: ...
    def step(
        self, max_norm: float, loss: torch.Tensor, veto: Veto | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def eval_loss(self, batch: Batch) -> torch.Tensor: ...
    def state(self) -> dict[str, Stateful]: ...


class ModelState:
    """The model's parameters as a sharded, layout-independent state dict.

    ``after_load`` runs after the parameters are loaded (a resume, a rollback): whatever the
    engine derives from the weights must follow them, as after an update."""

    def __init__(self, model: nn.Module, after_load: Callable[[], None] | None = None) -> None:
        self.model = model
        self.after_load = after_load

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model, options=STATE_OPTIONS)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state, options=STATE_OPTIONS)
        if self.after_load is not None:
            self.after_load()


class OptimizerState:
    """The optimizer's moments and hyper-parameters, keyed by parameter name."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer, options=STATE_OPTIONS)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state, options=STATE_OPTIONS)


def apply_update(
    optimizer: torch.optim.Optimizer, nonfinite: torch.Tensor, *, keep_grads: bool = False
) -> None:
    """The optimizer step, skipped when ``nonfinite`` (a device flag) is set, without a host sync
    where the optimizer can skip on the device (fused AdamW reads ``found_inf``).

    ``keep_grads``: zero the gradients in place instead of dropping them. Under DDP they are
    views into its all-reduce buckets; dropped, the first micro-batch of the next step would
    allocate new ones (DDP hands the bucket views back only when it syncs), one more copy of
    every gradient for the whole accumulation (measured: docs/planner.md)."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = nonfinite.float()  # type: ignore[attr-defined]
        optimizer.step()
    elif not nonfinite.item():  # foreach/for-loop AdamW cannot skip on the device
        optimizer.step()
    optimizer.zero_grad(set_to_none=not keep_grads)


class TorchEngine:
    """One process, FSDP2/HSDP, tensor + sequence, pipeline and context parallelism."""

    def __init__(
        self,
        cfg: Config,
        dims: ParallelDims,
        mesh: DeviceMesh | None,
        device: torch.device,
        precision: Precision,
    ) -> None:
        self.dims, self.mesh, self.device, self.precision = dims, mesh, device, precision
        self.cp_method = cfg.parallel.cp_method
        # FSDP2 and DDP (replicas only) both reduce gradients in backward, on the last
        # micro-batch only (set_requires_gradient_sync), or FSDP2 on every one where
        # parallel.reduce_every_microbatch asks it to keep only sharded gradients.
        self._fsdp = uses_fsdp(dims, mesh, cfg.parallel)
        self._ddp = uses_ddp(dims, mesh, cfg.parallel)
        self.syncs_grads = self._fsdp or self._ddp
        self._reduce_every = self._fsdp and cfg.parallel.reduce_every_microbatch
        built = build_parallel_model(
            cfg.model,
            cfg.parallel,
            dims,
            mesh,
            device,
            precision.compute_dtype,
            cfg.train.seed,
            pipeline_microbatches(cfg, dims) if dims.pp > 1 else 1,
            cfg.float8,
        )
        self.float8 = cfg.float8
        self.model_parts = built.parts
        # Found once: the step sets their aux-loss scale without walking the module tree.
        self._moe_layers = [m for part in self.model_parts for m in moe_layers(part).values()]
        self.pipeline = built.pipeline
        self.model = built.model
        self.optimizer: torch.optim.Optimizer = build_optimizer(
            nn.ModuleList(self.model_parts), cfg.optim
        )
        self._pp_group = mesh["pp"].get_group() if mesh is not None and dims.pp > 1 else None
        # Each token's loss lives on one (data, context) rank of the last pipeline stage.
        self._loss_groups = [
            mesh[axis].get_group()
            for axis in ("dp_cp", "pp")
            if mesh is not None and mesh[axis].size() > 1
        ]

    def state(self) -> dict[str, Stateful]:
        return {
            "model": ModelState(self.model, after_load=self._precompute_scales),
            "optim": OptimizerState(self.model, self.optimizer),
        }

    def _train_mode(self, on: bool) -> None:
        for part in self.model_parts:
            part.train(on)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    def _model_inputs(
        self, x: torch.Tensor, y: torch.Tensor, positions: torch.Tensor | None
    ) -> tuple[
        torch.Tensor, torch.Tensor, dict[str, torch.Tensor], contextlib.AbstractContextManager
    ]:
        """(inputs, labels, the model's keyword arguments, context) of one micro-batch. With
        per-document positions (data.document_positions) the model gets them for RoPE and the
        document ids of the whole rows for attention's mask. Under context parallelism: this
        rank's slice of every sequence (Ulysses), or the ring-attention context that shards
        them in place."""
        x, y = self._to_device(x), self._to_device(y)
        kwargs: dict[str, torch.Tensor] = {}
        if positions is not None:
            positions = self._to_device(positions)
            kwargs["documents"] = document_ids(positions)
        if self.dims.cp == 1:
            if positions is not None:
                kwargs["positions"] = positions
            return x, y, kwargs, contextlib.nullcontext()
        assert self.mesh is not None  # cp > 1 means several ranks
        cp_mesh = self.mesh["cp"]
        if self.cp_method == "ulysses":
            x, y, kwargs["positions"] = context_parallel.shard_sequence(x, y, cp_mesh, positions)
            return x, y, kwargs, contextlib.nullcontext()
        # Ring attention (check_layout refuses document masks with it) shards in place.
        kwargs["positions"] = torch.arange(x.shape[1], device=x.device)
        return x, y, kwargs, context_parallel.ring_context(cp_mesh, x, y, kwargs["positions"])

    def forward_backward(self, batch: Batch, num_tokens: float) -> torch.Tensor:
        """Forward and backward of every micro-batch (gradient accumulation, or the pipeline
        schedule); each token's loss is divided by the global token count."""
        self._train_mode(True)
        set_aux_loss_scale(self._moe_layers, 1.0 / num_tokens)
        if self.pipeline is not None:
            x = self._to_device(torch.cat(batch.inputs))
            y = self._to_device(torch.cat(batch.labels))
            kwargs = {}
            if batch.positions is not None:
                pos = self._to_device(torch.cat(batch.positions))
                kwargs = {"positions": pos, "documents": document_ids(pos)}
            with self.precision.context():
                return self.pipeline.step(x, y, num_tokens, **kwargs)
        loss_sum = torch.zeros((), device=self.device)
        last = len(batch.inputs) - 1
        for i, (x, y) in enumerate(zip(batch.inputs, batch.labels)):
            if self.syncs_grads:  # reduce gradients after the last micro-batch (or each)
                sync = i == last or self._reduce_every
                cast("FSDPModule", self.model).set_requires_gradient_sync(sync)
            doc_positions = batch.positions[i] if batch.positions is not None else None
            x, y, kwargs, ring = self._model_inputs(x, y, doc_positions)
            with ring:
                with self.precision.context():
                    loss = self.model(x, y, **kwargs)
                (loss / num_tokens).backward()
            loss_sum += loss.detach().float()
        return loss_sum

    def reduce_loss(self, loss_sum: torch.Tensor) -> torch.Tensor:
        for group in self._loss_groups:
            dist.all_reduce(loss_sum, group=group)
        return loss_sum

    def step(
        self, max_norm: float, loss: torch.Tensor, veto: Veto | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        params = [p for part in self.model_parts for p in part.parameters()]
        grad_norm = clip_grad_norm_(params, max_norm, self._pp_group)
        skip = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if veto is not None:
            skip = skip | veto(loss, grad_norm)
        apply_update(self.optimizer, skip, keep_grads=self._ddp)
        self._precompute_scales()
        return grad_norm, skip

    def _precompute_scales(self) -> None:
        """FP8 all-gather's weight scales from the weights as they are now: after each update,
        and after a load (resume, rollback), which changes the weights without one; stale
        scales would cast the first step's weights with the old weights' scales."""
        precompute_scales(self.model_parts, self.float8, self._fsdp)

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> torch.Tensor:
        self._train_mode(False)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, (x, y) in enumerate(zip(batch.inputs, batch.labels)):
            # Evaluation runs without pipeline or context parallelism (check_layout).
            kwargs: dict[str, torch.Tensor] = {}
            if batch.positions is not None:
                kwargs["positions"] = self._to_device(batch.positions[i])
                kwargs["documents"] = document_ids(kwargs["positions"])
            x, y = self._to_device(x), self._to_device(y)
            with self.precision.context():
                total += self.model(x, y, **kwargs).double()
        return total


def build_engine(
    cfg: Config, dims: ParallelDims, mesh: DeviceMesh | None, device: torch.device
) -> Engine:
    """The engine ``parallel.engine`` names, with the run's precision policy."""
    check_float8(cfg.float8, device)
    if cfg.parallel.engine == "deepspeed":
        from eurotrain.parallel.deepspeed import DeepSpeedEngine

        if cfg.float8.enabled:
            raise ConfigError(
                "float8.enabled runs with parallel.engine fsdp only (DeepSpeed keeps its own "
                "module wrappers); set parallel.engine fsdp or float8.enabled false"
            )

        precision = Precision.resolve(cfg.train.mixed_precision, device, casts_itself=False)
        return DeepSpeedEngine(cfg, dims, device, precision)
    casts_itself = uses_fsdp(dims, mesh, cfg.parallel)
    precision = Precision.resolve(cfg.train.mixed_precision, device, casts_itself)
    return TorchEngine(cfg, dims, mesh, device, precision)
