"""Parallel layout configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from eurotrain.configtools import ConfigError

PPSchedule = Literal["1f1b", "gpipe", "interleaved_1f1b", "zbv", "interleaved_zb"]
PP_SCHEDULES: tuple[str, ...] = get_args(PPSchedule)
"""Pipeline schedules (parallel.pp_schedule)."""
MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "zbv", "interleaved_zb")
"""Schedules that run several stages per rank."""
VIRTUAL_STAGE_SCHEDULES = ("interleaved_1f1b", "interleaved_zb")
ZERO_BUBBLE_SCHEDULES = ("zbv", "interleaved_zb")
"""Schedules that split a stage's backward into an input pass and a weight pass."""
"""Schedules whose stages per rank are parallel.pp_virtual_stages (zbv always has 2)."""


@dataclass
class ParallelConfig:
    """Degrees of each parallel axis; their product is the world size. -1 means "the rest"."""

    dp_replicate: int = 1
    """Data-parallel replicas (HSDP's replicate axis: full copies, gradients all-reduced)."""
    dp_shard: int = -1
    """Data-parallel shards (FSDP2: parameters, gradients and optimizer state sharded)."""
    cp: int = 1
    """Context parallel: each sequence split across this many ranks."""
    tp: int = 1
    """Tensor parallel (with sequence parallel): each layer's weights split across ranks."""
    pp: int = 1
    """Pipeline parallel: consecutive layers on consecutive ranks."""
    ep: int = 1
    """Expert parallel (mixture-of-experts models): each MoE block's experts split across this
    many ranks of dp_shard (ep divides dp_shard and takes no extra ranks); tokens travel to
    their experts' ranks and back by all-to-all."""
    engine: Literal["fsdp", "deepspeed"] = "fsdp"
    """Data-parallel engine: PyTorch FSDP2 or DeepSpeed ZeRO (data parallelism only)."""
    reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after forward (ZeRO-3); false keeps them (ZeRO-2-like)."""
    reduce_every_microbatch: bool = False
    """FSDP2/HSDP under gradient accumulation: reduce-scatter the gradients after every
    micro-batch, so that only sharded gradients are kept between them. False (the default)
    reduces once, after the last micro-batch: less communication, but every unsharded fp32
    gradient of the model stays from the first micro-batch on. Refused with pipelining (its
    schedule reduces once per step) and DeepSpeed (ZeRO-2/3 do this themselves); no effect where
    nothing is sharded (one process, replicas only)."""
    fsdp_cpu_offload: bool = False
    """FSDP2: keep sharded parameters, gradients and optimizer state in CPU memory."""
    sequence_parallel: bool | None = None
    """With tp > 1, also split norms and residuals along the sequence; null means true."""
    pp_schedule: PPSchedule = "1f1b"
    """Pipeline schedule: 1f1b, gpipe, interleaved_1f1b (virtual stages), zbv (zero-bubble V,
    two stages per rank) or interleaved_zb (zero-bubble interleaved, virtual stages)."""
    pp_virtual_stages: int = 1
    """Stages per rank for interleaved_1f1b / interleaved_zb (zbv always uses 2)."""
    pp_microbatches: int | None = None
    """Micro-batches per pipeline step; null means the data-parallel rank's batch divided by
    train.micro_batch_size. Must be >= the number of pipeline stages."""
    pp_layers: list[int] | None = None
    """Transformer blocks per stage, in stage order (sums to model.num_layers); null means
    balanced, the first stages taking the remainder."""
    cp_method: Literal["ulysses", "ring"] = "ulysses"
    """ulysses: all-to-all from sequence shards to head shards around attention (any device);
    ring: PyTorch's context_parallel ring attention (GPU only)."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations in backward: full blocks, or selective (keep matmul outputs,
    recompute the cheap element-wise ops)."""
    ac_every: int = 1
    """Checkpoint every k-th block (1 = all blocks)."""
    compile: bool = False
    """torch.compile each block in place (parameter names unchanged)."""
    zero_stage: int = 3
    """DeepSpeed ZeRO stage (1: optimizer state, 2: + gradients, 3: + parameters sharded)."""
    zero_bucket_size: int = 500_000_000
    """Elements per DeepSpeed gradient-reduction bucket (its reduce_bucket_size, and for ZeRO-1/2
    its allgather_bucket_size). DeepSpeed allocates a bucket at this size whatever the model's:
    5e8 (its default) is 1 GB in bf16, 2 GB in fp32, on every GPU; smaller buckets save memory
    for more, smaller collectives."""

    def __post_init__(self) -> None:
        axes = ("dp_replicate", "dp_shard", "cp", "tp", "pp")
        for key in axes:
            value = getattr(self, key)
            if value == 0 or value < -1:
                raise ConfigError(f"parallel.{key}: {value} must be a positive integer or -1")
        if sum(getattr(self, k) == -1 for k in axes) > 1:
            raise ConfigError("only one of parallel.dp_replicate/dp_shard/cp/tp/pp may be -1")
        if self.ep < 1:
            raise ConfigError(f"parallel.ep: {self.ep} must be a positive integer (1 = off)")
        if self.pp_virtual_stages < 1:
            raise ConfigError(f"parallel.pp_virtual_stages: {self.pp_virtual_stages} must be >= 1")
        if self.pp_virtual_stages > 1 and self.pp_schedule not in VIRTUAL_STAGE_SCHEDULES:
            raise ConfigError(
                f"parallel.pp_virtual_stages = {self.pp_virtual_stages} needs an interleaved "
                f"schedule: set parallel.pp_schedule to interleaved_1f1b or interleaved_zb "
                f"(it is {self.pp_schedule})"
            )
        if self.pp_microbatches is not None and self.pp_microbatches < 1:
            raise ConfigError(f"parallel.pp_microbatches: {self.pp_microbatches} must be >= 1")
        if self.pp_layers is not None and any(n < 1 for n in self.pp_layers):
            raise ConfigError(f"parallel.pp_layers: {self.pp_layers}: every stage needs >= 1 block")
        if self.ac_every < 1:
            raise ConfigError(f"parallel.ac_every: {self.ac_every} must be >= 1")
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"parallel.zero_stage: {self.zero_stage} must be 1, 2 or 3")
        if self.zero_bucket_size < 1:
            raise ConfigError(
                f"parallel.zero_bucket_size: {self.zero_bucket_size} must be a positive number of "
                f"elements (DeepSpeed's default is 500000000)"
            )

    def stages_per_rank(self) -> int:
        """Pipeline stages each pipeline rank holds under the chosen schedule."""
        if self.pp_schedule == "zbv":
            return 2
        return self.pp_virtual_stages
