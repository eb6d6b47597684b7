"""build_parallel_model(): the model built on the meta device, split and wrapped for the layout,
then materialised and initialised. The order is torchtitan's: tensor parallelism, context
parallelism, activation checkpointing, compile, then FSDP2 on top."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from eurotrain.models.config import ModelConfig
from eurotrain.models.llama import Transformer, build_model
from eurotrain.parallel.ac import apply_ac, apply_compile
from eurotrain.parallel.config import ParallelConfig
from eurotrain.parallel.cp import apply_ulysses
from eurotrain.parallel.ddp import apply_ddp
from eurotrain.parallel.dims import ParallelDims
from eurotrain.parallel.ep import apply_moe_parallel, expert_modules
from eurotrain.parallel.float8 import Float8Config, apply_float8
from eurotrain.parallel.fsdp import apply_fsdp
from eurotrain.parallel.pipeline import Pipeline, merged_view
from eurotrain.parallel.tp import apply_tp


def uses_ddp(dims: ParallelDims, mesh: DeviceMesh | None, cfg: ParallelConfig) -> bool:
    """Replicas only (dp_replicate > 1, every other degree 1): DDP's bucketed all-reduce."""
    others = (dims.dp_shard, dims.cp, dims.tp, dims.pp)
    return (
        mesh is not None
        and cfg.engine == "fsdp"
        and dims.dp_replicate > 1
        and others
        == (
            1,
            1,
            1,
            1,
        )
    )


def uses_fsdp(dims: ParallelDims, mesh: DeviceMesh | None, cfg: ParallelConfig) -> bool:
    """FSDP2 runs whenever gradients must be reduced over data or context-parallel ranks, except
    for replicas only (DDP)."""
    return (
        mesh is not None
        and cfg.engine == "fsdp"
        and dims.dp * dims.cp > 1
        and not uses_ddp(dims, mesh, cfg)
    )


def parallelize(
    model: nn.Module,
    dims: ParallelDims,
    mesh: DeviceMesh | None,
    cfg: ParallelConfig,
    param_dtype: torch.dtype,
    device: torch.device | None = None,
    float8: Float8Config | None = None,
) -> nn.Module:
    """Apply FP8 linears, TP, CP (Ulysses), AC, compile and FSDP2/HSDP (or DDP, for replicas
    only) to one model (or pipeline stage)."""
    if float8 is not None:
        apply_float8(model, float8, fsdp=uses_fsdp(dims, mesh, cfg))
    sp = cfg.sequence_parallel if cfg.sequence_parallel is not None else True
    if mesh is not None and dims.tp > 1:
        apply_tp(model, mesh["tp"], sequence_parallel=sp)
        # Each module got its own DTensor. The embedding (RowwiseParallel) and the output
        # (ColwiseParallel) both shard the [vocab, dim] weight on dim 0, so one DTensor serves
        # both; FSDP below then registers it once and sets it on both modules.
        cast(Transformer, model).tie_weights()
    if mesh is not None and (dims.ep > 1 or dims.tp > 1 or dims.cp > 1):
        apply_moe_parallel(model, mesh, dims.ep, dims.tp, dims.cp, sequence_parallel=sp)
    if mesh is not None and dims.cp > 1 and cfg.cp_method == "ulysses":
        apply_ulysses(model, mesh["cp"])
    apply_ac(model, cfg.activation_checkpointing, cfg.ac_every)
    if cfg.compile:
        apply_compile(model)
    if uses_fsdp(dims, mesh, cfg):
        assert mesh is not None
        dp_mesh = (
            mesh["dp_replicate", "dp_shard_cp"] if dims.dp_replicate > 1 else mesh["dp_shard_cp"]
        )
        apply_fsdp(
            model,
            dp_mesh,
            experts=(expert_modules(model), _expert_dp_mesh(dims, mesh)) if dims.ep > 1 else None,
            param_dtype=param_dtype,
            reduce_dtype=torch.float32,
            reshard_after_forward=cfg.reshard_after_forward,
            cpu_offload=cfg.fsdp_cpu_offload,
        )
    if uses_ddp(dims, mesh, cfg):
        assert mesh is not None
        apply_ddp(model, mesh["dp_replicate"].get_group(), device or torch.device("cpu"))
    return model


def _expert_dp_mesh(dims: ParallelDims, mesh: DeviceMesh) -> DeviceMesh:
    """The ranks that hold the same experts but different tokens: the experts' FSDP mesh."""
    if dims.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard_mod_ep_cp"]
    return mesh["dp_shard_mod_ep_cp"]


@dataclass
class ParallelModel:
    """The model parts this rank holds (one, or the stages of a pipeline) and the pipeline."""

    parts: list[nn.Module]
    pipeline: Pipeline | None
    model: nn.Module
    """parts[0], or under pipelining one module over all parts with the whole model's names."""


def build_parallel_model(
    model_cfg: ModelConfig,
    cfg: ParallelConfig,
    dims: ParallelDims,
    mesh: DeviceMesh | None,
    device: torch.device,
    param_dtype: torch.dtype,
    seed: int,
    num_microbatches: int = 1,
    float8: Float8Config | None = None,
) -> ParallelModel:
    """Build on meta, parallelize, materialise on ``device`` and initialise (layout-independent)."""
    pipeline = None
    if mesh is not None and dims.pp > 1:
        pipeline = Pipeline(
            model_cfg,
            mesh["pp"],
            cfg.pp_schedule,
            cfg.stages_per_rank(),
            num_microbatches,
            cfg.pp_layers,
        )
        parts = pipeline.parts
    else:
        parts = [build_model(model_cfg, "meta")]
    for part in parts:
        parallelize(part, dims, mesh, cfg, param_dtype, device, float8)
        # to_empty() gives each module a new plain tensor (a tied weight becomes two), while
        # DTensors (FSDP, TP) are swapped in place and stay shared: re-tie either way.
        part.to_empty(device=device)
        cast(Transformer, part).tie_weights()
        cast(Transformer, part).init_weights(seed)
    if pipeline is None:
        _check_param_count(parts[0], model_cfg)
        return ParallelModel(parts, None, parts[0])
    pipeline.build_schedule(device)
    return ParallelModel(parts, pipeline, merged_view(model_cfg, parts))


def _check_param_count(model: nn.Module, model_cfg: ModelConfig) -> None:
    """Each parameter counted once at its full size (a DTensor's numel is the global one): a
    tie that came apart would show up as vocab_size x dim parameters too many."""
    assert cast(Transformer, model).is_tied(), "output.weight is not tok_embeddings.weight"
    count = sum(p.numel() for p in model.parameters())
    assert count == model_cfg.num_params(), (
        f"{count} parameters, {model_cfg.num_params()} configured"
    )
