"""DeepSpeed ZeRO's memory per GPU (eurotrain/parallel/deepspeed.py runs it data-parallel only,
with DeepSpeed's defaults but for ``parallel.zero_bucket_size``), as measured on CPU in
docs/planner.md ("DeepSpeed ZeRO"). N is the model's parameter count, d the data-parallel size,
c the compute dtype's bytes (bf16 on GPUs; DeepSpeed accumulates gradients in it by default),
B the bucket size in elements:

- ZeRO-1/2 keep the parameters whole in one flat 16-bit buffer (N c) and shard the fp32 master
  weights and AdamW's moments (3 x 4 N / d). In backward each gradient is copied into a bucket
  (B c, allocated anew every micro-step); ZeRO-2 reduces it at once and keeps this rank's
  reduced partition (N c / d; with accumulation the rank whose partition fills first holds two),
  ZeRO-1 reduces only after the backward, so every gradient stays whole (N c) as the backward
  makes it, and under accumulation from the first micro-batch on, as DDP's do.
- ZeRO-3 shards the parameters too (N c / d) but keeps whole, on every rank, each one below
  ``stage3_param_persistence_threshold`` (1e5 elements: norms and small matrices), plus a flat
  gradient partition (N c / d) and a bucket (B c) for the whole run. In forward it holds the
  gathered parameters twice (the all-gather's flat buffer and the parameters' own tensors), up
  to ``stage3_max_live_parameters`` (1e9 elements), and once while the blocks' backward runs
  (it releases them as it goes).
- At the optimizer step every stage holds an fp32 gradient partition (4 N / d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from eurotrain.config import Config
from eurotrain.plan.activations import Precision
from eurotrain.plan.shapes import RankShare

FP32 = 4
PERSISTENCE_THRESHOLD = 100_000
"""DeepSpeed's stage3_param_persistence_threshold default: smaller parameters stay whole."""
MAX_LIVE_PARAMETERS = 1_000_000_000
"""DeepSpeed's stage3_max_live_parameters default: gathered elements kept before releasing."""


@dataclass(frozen=True)
class ZeroMemory:
    params: int
    """Persistent: the 16-bit parameters (whole, or ZeRO-3's partition and the small ones) and
    the fp32 master partition."""
    optimizer: int
    """AdamW's two moments over the fp32 partition."""
    grads: int
    """Gradient buffers alive through the backward."""
    gathered: int
    """ZeRO-3's gathered parameters in forward (and at the start of backward)."""
    gathered_in_backward: int
    """ZeRO-3's gathered parameters while the blocks' backward runs: once, as it releases the
    all-gather's buffers (measured: under checkpointing its peak is in the forward)."""
    buckets: int
    """The gradient-reduction bucket."""
    step_grads: int
    """Gradients alive at the optimizer step."""
    running: int
    """The largest single gradient, before it is copied into the bucket."""
    keeps_grads: bool = False
    """ZeRO-1: each gradient the backward makes stays whole until the step's reduction."""


def zero_memory(
    cfg: Config, share: RankShare, dp: int, prec: Precision, num_micro: int
) -> ZeroMemory:
    stage, c = cfg.parallel.zero_stage, prec.compute
    params = [(q, n) for group, n in share.groups for q in group]
    total = share.numel()
    part = math.ceil(total / dp)
    bucket = cfg.parallel.zero_bucket_size * c
    largest = max((q.numel for q, _ in params), default=0) * c
    master, moments, step_grads = part * FP32, 2 * part * FP32, part * FP32
    if stage in (1, 2):
        if stage == 1:
            grads = total * c if num_micro > 1 else 0
        else:
            grads = part * c * (2 if num_micro > 1 else 1)
        return ZeroMemory(
            total * c + master, moments, grads, 0, 0, bucket, step_grads, largest, stage == 1
        )
    small = sum(n * q.numel for q, n in params if q.numel < PERSISTENCE_THRESHOLD)
    big = total - small
    return ZeroMemory(
        params=part * c + small * c + master,
        optimizer=moments,
        grads=part * c,
        gathered=2 * min(big, MAX_LIVE_PARAMETERS) * c,
        gathered_in_backward=min(big, MAX_LIVE_PARAMETERS) * c,
        buckets=bucket,
        step_grads=step_grads,
        running=largest,
    )
