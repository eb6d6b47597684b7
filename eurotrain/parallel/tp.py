"""Tensor parallelism (+ sequence parallelism) from the model's plan, with the loss computed on
the vocabulary shards of the output projection (eurotrain/parallel/loss.py)."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import parallelize_module

from eurotrain.models.llama import IGNORE_INDEX, Transformer
from eurotrain.models.plans import llama_tp_plan
from eurotrain.parallel.loss import vocab_parallel_linear_cross_entropy


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> nn.Module:
    """Split ``model`` (a Transformer or a pipeline stage of one) over ``tp_mesh`` in place.

    Parts a pipeline stage dropped (None) are skipped, so every stage gets its share of the plan.
    """
    top, block = llama_tp_plan(sequence_parallel)
    present = {k: v for k, v in top.items() if getattr(model, k, None) is not None}
    parallelize_module(model, tp_mesh, present)
    for layer in cast(nn.ModuleDict, model.layers).values():
        parallelize_module(layer, tp_mesh, {k: v for k, v in block.items() if _has(layer, k)})
    if getattr(model, "output", None) is not None:
        use_triton = cast(Transformer, model).ops.backend == "triton"
        model.loss_fn = VocabParallelCrossEntropy(tp_mesh, use_triton)  # type: ignore[assignment]
    return model


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


class VocabParallelCrossEntropy:
    """The model's loss under tensor parallelism: the fused, chunked linear + cross-entropy on
    this rank's vocabulary shard of the output projection (the logits are never materialised,
    not even vocabulary-sharded). The chunk math runs in Triton when the model's kernel set is
    "triton" and Triton can run, else in PyTorch."""

    def __init__(self, tp_mesh: DeviceMesh, use_triton: bool) -> None:
        self.tp_mesh = tp_mesh
        self.use_triton = use_triton

    def __call__(self, h: torch.Tensor, output: nn.Module, labels: torch.Tensor) -> torch.Tensor:
        # h stays [B, S, D]: under sequence parallelism it is a DTensor sharded on S.
        return vocab_parallel_linear_cross_entropy(
            h, cast(nn.Linear, output).weight, labels, self.tp_mesh, IGNORE_INDEX,
            use_triton=None if self.use_triton else False,
        )  # fmt: skip
