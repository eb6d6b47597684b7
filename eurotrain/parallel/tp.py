"""Tensor parallelism (+ sequence parallelism) from the model's plan, and the loss on the
vocabulary-sharded logits (loss parallel)."""

from __future__ import annotations

import contextlib
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import loss_parallel, parallelize_module

from eurotrain.models.llama import IGNORE_INDEX
from eurotrain.models.plans import llama_tp_plan


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> nn.Module:
    """Split ``model`` (a Transformer or a pipeline stage of one) over ``tp_mesh`` in place.

    Parts a pipeline stage dropped (None) are skipped, so every stage gets its share of the plan.
    """
    top, block = llama_tp_plan(sequence_parallel)
    present = {k: v for k, v in top.items() if getattr(model, k, None) is not None}
    parallelize_module(model, tp_mesh, present)
    for layer in cast(nn.ModuleDict, model.layers).values():
        parallelize_module(layer, tp_mesh, block)
    if getattr(model, "output", None) is not None:
        model.loss_fn = loss_parallel_cross_entropy  # type: ignore[assignment]
    return model


def loss_parallel_cross_entropy(
    h: torch.Tensor, output: nn.Module, labels: torch.Tensor
) -> torch.Tensor:
    """The model's loss under tensor parallelism: the vocabulary-sharded logits of the output
    projection and PyTorch's loss_parallel (run forward and backward inside loss_context())."""
    return plain(sharded_cross_entropy(output(h), labels))


def loss_context(tp: int) -> contextlib.AbstractContextManager:
    """loss_parallel() under tensor parallelism (forward and backward must run inside it)."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()


def sharded_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy of [B, S, V] logits (a DTensor sharded on V under tp), in
    fp32; run inside loss_context()."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def plain(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value as a plain tensor (the replicated loss under tp); else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
