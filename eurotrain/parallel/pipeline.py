"""Pipeline parallelism through torch.distributed.pipelining.

The model is split by block counts into stages; a stage is the same Transformer class with the
blocks it does not own deleted and the embedding / final norm / output set to None where another
stage owns them, so parameter names (``layers.5.attention.wq.weight``) are those of the whole
model: checkpoints and initialisation do not depend on the split. Each pipeline rank holds one
stage, or several (virtual stages) for the interleaved and zero-bubble schedules: "loop" order
(rank r holds stages r, r + pp, ...) or "V" order for ZBV (rank r holds r and 2 pp - 1 - r).

The last stage's loss is the summed cross-entropy divided by the global token count (set each
step), and schedules run with scale_grads=False, so the gradients equal a single-process run's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

from eurotrain.models.config import ModelConfig
from eurotrain.models.llama import Transformer, build_model
from eurotrain.models.moe import MoE, moe_layers
from eurotrain.parallel.checks import balanced_split
from eurotrain.parallel.config import MULTI_STAGE_SCHEDULES, PP_SCHEDULES

SCHEDULES = {
    "1f1b": Schedule1F1B,
    "gpipe": ScheduleGPipe,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "interleaved_zb": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
}
assert set(SCHEDULES) == set(PP_SCHEDULES), "every configurable schedule has a class"


def stage_ids(pp_rank: int, pp: int, per_rank: int, schedule: str) -> list[int]:
    """The pipeline stages this rank holds, in increasing order (PyTorch's warm-up vote walks
    them in list order; descending order trips an AssertionError in _warmup_forward_vote)."""
    if schedule == "zbv":
        return sorted((pp_rank, 2 * pp - 1 - pp_rank))
    return [pp_rank + k * pp for k in range(per_rank)]


def build_stage_model(cfg: ModelConfig, stage: int, layers_per_stage: list[int]) -> Transformer:
    """The whole model on the meta device, cut down to ``stage``'s blocks (names kept)."""
    model = build_model(cfg, "meta")
    start = sum(layers_per_stage[:stage])
    keep = {str(i) for i in range(start, start + layers_per_stage[stage])}
    for key in list(model.layers.keys()):
        if key not in keep:
            del model.layers[key]
    if stage > 0:
        model.tok_embeddings = None
    if stage < len(layers_per_stage) - 1:
        model.norm = None
        model.output = None
    return model


class _UncountedFirstForward:
    """One-shot hooks on an MoE layer: its first forward is the schedule's shape inference (every
    stage's forward, run once before the first step's micro-batches on uninitialised tensors for
    all but the first stage), whose routed-token counts (and aux-loss sums) must not reach the
    balancing and the log."""

    def __init__(self, layer: MoE) -> None:
        self.saved: tuple[torch.Tensor, torch.Tensor] | None = None
        self.handles = [
            layer.register_forward_pre_hook(self.before),
            layer.register_forward_hook(self.after),
        ]

    def before(self, layer: nn.Module, args: tuple) -> None:
        moe = cast(MoE, layer)
        self.saved = moe.tokens_per_expert.clone(), moe.aux_loss_sum.clone()

    def after(self, layer: nn.Module, args: tuple, out: torch.Tensor) -> None:
        assert self.saved is not None
        moe = cast(MoE, layer)
        moe.tokens_per_expert.copy_(self.saved[0])
        moe.aux_loss_sum.copy_(self.saved[1])
        for handle in self.handles:
            handle.remove()


def merged_view(model_cfg: ModelConfig, parts: list[nn.Module]) -> Transformer:
    """One Transformer holding every block and end piece of ``parts`` (the same modules, not
    copies), so its parameter names are the whole model's: checkpoints and optimizer state of a
    rank with several (virtual) stages look exactly like those of a rank with one."""
    view = build_model(model_cfg, "meta")
    view.layers = nn.ModuleDict(
        {k: m for part in parts for k, m in cast(nn.ModuleDict, part.layers).items()}
    )
    for name in ("tok_embeddings", "norm", "output"):
        owners = [getattr(part, name) for part in parts if getattr(part, name) is not None]
        setattr(view, name, owners[0] if owners else None)
    return view


@dataclass
class PipelineLoss:
    """loss_fn of the schedule: the last stage's output is already its summed CE (the model
    computes it, given the labels as a keyword argument); divide by the global token count
    (set before each step)."""

    num_tokens: torch.Tensor | float = 1.0
    summed: list[torch.Tensor] = field(default_factory=list)

    def __call__(self, summed_ce: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        del labels  # consumed by the last stage's forward
        self.summed.append(summed_ce.detach())
        return summed_ce / self.num_tokens


class Pipeline:
    """This rank's stage modules and the schedule that runs them."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        pp_mesh: DeviceMesh,
        schedule: str,
        per_rank: int,
        num_microbatches: int,
        layers_per_stage: list[int] | None,
    ) -> None:
        pp, rank = pp_mesh.size(), pp_mesh.get_local_rank()
        self.num_stages = pp * per_rank
        self.layers = layers_per_stage or balanced_split(model_cfg.num_layers, self.num_stages)
        self.stage_ids = stage_ids(rank, pp, per_rank, schedule)
        self.parts: list[nn.Module] = [
            build_stage_model(model_cfg, s, self.layers) for s in self.stage_ids
        ]
        self.pp_mesh = pp_mesh
        self.schedule_name = schedule
        self.num_microbatches = num_microbatches
        self.loss_fn = PipelineLoss()
        self.has_first = 0 in self.stage_ids
        self.has_last = self.num_stages - 1 in self.stage_ids
        self.schedule = None
        self._inferred = False

    def build_schedule(self, device: torch.device) -> None:
        """Wrap the (parallelized, initialised) parts in PipelineStages and make the schedule."""
        group = self.pp_mesh.get_group()
        stages = [
            PipelineStage(part, s, self.num_stages, device, group=group)
            for part, s in zip(self.parts, self.stage_ids)
        ]
        cls = SCHEDULES[self.schedule_name]
        multi = self.schedule_name in MULTI_STAGE_SCHEDULES
        self.schedule = cls(
            stages if multi else stages[0],
            n_microbatches=self.num_microbatches,
            loss_fn=self.loss_fn,
            scale_grads=False,  # the loss is already normalised by the global token count
        )

    def step(
        self, x: torch.Tensor, y: torch.Tensor, num_tokens: float, **model_kwargs: torch.Tensor
    ) -> torch.Tensor:
        """Forward and backward of one local batch; returns this rank's summed CE (0 if it
        holds no last stage). ``model_kwargs`` ([B, S] positions and documents of packed
        documents) reach every stage's forward, split into micro-batches like the inputs."""
        assert self.schedule is not None, "call build_schedule() first"
        self.loss_fn.num_tokens = num_tokens
        self.loss_fn.summed.clear()
        args = (x,) if self.has_first else ()
        kwargs: dict = dict(model_kwargs)
        if self.has_last:
            kwargs.update(target=y, losses=[], labels=y)
        if not self._inferred:  # the first step begins with PyTorch's shape inference
            self._inferred = True
            for part in self.parts:
                for layer in moe_layers(part).values():
                    _UncountedFirstForward(layer)
        # The last stage's outputs are per-micro-batch losses, kept by loss_fn: nothing to merge.
        self.schedule.step(*args, return_outputs=False, **kwargs)
        if not self.loss_fn.summed:
            return torch.zeros((), device=x.device)
        # The first step may also run the loss during shape inference: count the last ones.
        return torch.stack(self.loss_fn.summed[-self.num_microbatches :]).sum().float()
