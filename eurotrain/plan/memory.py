"""Memory per GPU of one layout: the peak of a training step on the busiest rank, by component.

What the code does, and the model follows (docs/planner.md has the derivations):

- Master weights, gradients and AdamW's two moments are fp32, sharded by FSDP2 over
  dp_shard x cp (each parameter's dim 0 padded to a multiple of the shard count), whole
  otherwise; tensor parallelism splits them first (eurotrain/plan/shapes.py), expert
  parallelism splits a mixture of experts' routed experts (eurotrain/plan/moe.py).
- FSDP2 gathers one block at a time in the compute dtype (two while the next is prefetched in
  backward), the root group (embedding, final norm, output) for the whole forward and again
  for the whole backward. Gradient accumulation skips the reduce-scatter until the last
  micro-batch (eurotrain/parallel/engine.py), so FSDP then holds every unsharded gradient in
  fp32 from the first micro-batch on; with parallel.reduce_every_microbatch it reduces after
  each, and holds the sharded gradients plus the running block's unsharded ones.
- Under pipelining the schedule (torch.distributed.pipelining) keeps FSDP's gathered parameters
  and unsharded gradients for the whole step (no reshard, no gradient sync before the last
  backward), preallocates one receive buffer per micro-batch for activations and one for
  gradients per stage, and keeps some micro-batches' activations in flight: 1F1B pp - rank,
  GPipe all of them; the multi-stage schedules (interleaved 1F1B, the zero-bubble ones) what
  their order leaves alive at each action (eurotrain/plan/schedules.py).
- Without FSDP on a GPU, autocast keeps a bf16 copy of every weight from forward to backward.
- Outside what the model allocates: an allowance for the caching allocator's fragmentation and
  a fixed runtime share (CUDA context, NCCL buffers) on GPUs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from itertools import accumulate

from eurotrain.config import Config
from eurotrain.configtools import ConfigError
from eurotrain.parallel.checks import accumulation_steps, pipeline_microbatches
from eurotrain.parallel.dims import ParallelDims
from eurotrain.plan import activations as act
from eurotrain.plan import schedules, zero
from eurotrain.plan.shapes import (
    Param,
    RankShare,
    Shards,
    expert_parallel,
    fsdp_shards,
    padded_numel,
    rank_shares,
)

GIB = 1024**3
FP32 = 4
ALLOCATOR_FRACTION = 0.10
"""Caching-allocator allowance: reserved minus allocated bytes at the peak, as a fraction of the
allocated peak (fragmentation; typically 5-20 % for LLM training steps)."""
RUNTIME_BYTES = int(1.0 * GIB)
"""CUDA/ROCm context, cuBLAS workspaces and the first communicator's buffers: memory the
allocator never sees. Each further communicator (mesh axis > 1) adds COMMUNICATOR_BYTES."""
COMMUNICATOR_BYTES = int(0.25 * GIB)


@dataclass
class MemoryEstimate:
    """Bytes per GPU at the peak of a step on the busiest rank. The first eight add up to what
    the model allocates (``model_bytes``); allocator and runtime come on top."""

    params: int = 0
    """Master weights (and buffers) this rank keeps."""
    optimizer: int = 0
    """AdamW's moments (and step counters)."""
    grads: int = 0
    """Gradients at the peak: sharded ones, and unsharded ones kept for accumulation."""
    activations: int = 0
    """Saved for backward, over all micro-batches in flight."""
    loss: int = 0
    """The loss's buffers and temporaries at the peak."""
    gathered: int = 0
    """Unsharded parameters (FSDP2 all-gathers, autocast copies)."""
    buffers: int = 0
    """Pipeline receive buffers."""
    workspace: int = 0
    """Backward temporaries (activation gradients, recomputed blocks)."""
    allocator: int = 0
    runtime: int = 0
    pp_rank: int = 0
    """The pipeline rank this peak belongs to."""

    @property
    def model_bytes(self) -> int:
        return (
            self.params + self.optimizer + self.grads + self.activations + self.loss
            + self.gathered + self.buffers + self.workspace
        )  # fmt: skip

    @property
    def total(self) -> int:
        return self.model_bytes + self.allocator + self.runtime

    def as_gib(self) -> dict[str, float]:
        out = {k: round(v / GIB, 3) for k, v in asdict(self).items() if k != "pp_rank"}
        out["total"] = round(self.total / GIB, 3)
        return out


@dataclass(frozen=True)
class Setting:
    """What the memory of a layout depends on besides the config: the device kind."""

    cuda: bool
    """GPU run (bf16 by default, NCCL, caching allocator) or CPU (fp32, no allowance)."""


def estimate(cfg: Config, dims: ParallelDims, setting: Setting) -> MemoryEstimate:
    """The peak per GPU of one layout (the busiest pipeline rank's)."""
    return max(estimate_ranks(cfg, dims, setting), key=lambda e: e.total)


def over_memory(cfg: Config, dims: ParallelDims, device_gib: float, device: str) -> str:
    """A note when the predicted peak of this layout on a GPU is above the whole memory of the
    device (not a fraction of it: the model errs on the safe side); "" otherwise."""
    peak = estimate(cfg, dims, Setting(cuda=True)).total / GIB
    if peak <= device_gib:
        return ""
    return (
        f"the planner predicts a peak of {peak:.1f} GiB per GPU for {dims.describe()}, more "
        f"than the {device_gib:g} GiB of each {device}: the first step will likely run out of "
        f"memory; `eurotrain plan CONFIG --cluster ... --nodes ...` lists layouts that fit "
        f"(more dp_shard or tp, activation checkpointing, a smaller micro-batch)"
    )


def estimate_ranks(cfg: Config, dims: ParallelDims, setting: Setting) -> list[MemoryEstimate]:
    """The peak of each pipeline rank (one entry without pipelining)."""
    ests = [_torch_rank(cfg, dims, setting, share) for share in rank_shares(cfg, dims)]
    for est in ests:
        _add_overheads(est, dims, setting, expert_parallel(cfg))
    return ests


def _add_overheads(est: MemoryEstimate, dims: ParallelDims, setting: Setting, ep: int) -> None:
    if setting.cuda:
        est.allocator = int(ALLOCATOR_FRACTION * est.model_bytes)
        axes = sum(1 for v in dims.degrees().values() if v > 1)
        # expert parallelism: the ep group's all-to-alls, and the experts' own FSDP group
        axes += (ep > 1) + (1 < dims.dp_shard // ep * dims.cp < dims.dp_shard * dims.cp)
        est.runtime = RUNTIME_BYTES + max(0, axes - 1) * COMMUNICATOR_BYTES


def uses_fsdp(cfg: Config, dims: ParallelDims) -> bool:
    """Whether the engine wraps the model in FSDP2 (eurotrain/parallel/parallelize.py
    uses_fsdp): gradients reduced over data or context-parallel ranks, except replicas only
    (DDP)."""
    replicas_only = dims.dp_replicate > 1 and (dims.dp_shard, dims.cp, dims.tp, dims.pp) == (
        1, 1, 1, 1,
    )  # fmt: skip
    return cfg.parallel.engine == "fsdp" and dims.dp * dims.cp > 1 and not replicas_only


def fsdp_accumulates(cfg: Config, dims: ParallelDims) -> bool:
    """FSDP2 outside a pipeline with more than one micro-batch per step: where
    parallel.reduce_every_microbatch changes when the gradients are reduced."""
    return uses_fsdp(cfg, dims) and dims.pp == 1 and accumulation_steps(cfg, dims) > 1


def precision(cfg: Config, dims: ParallelDims, setting: Setting) -> act.Precision:
    """The byte sizes of eurotrain's precision policy (eurotrain/parallel/engine.py Precision):
    bf16 on GPUs, or asked for by name; FSDP2 casts the parameters itself, elsewhere autocast
    (on a CPU too) casts each matmul's inputs."""
    mp = cfg.train.mixed_precision
    # DeepSpeed's bf16 mode casts the model: its autocast then finds bf16 weights
    casts_itself = uses_fsdp(cfg, dims) or cfg.parallel.engine == "deepspeed"
    bf16 = mp == "bf16" or (mp == "auto" and setting.cuda)
    return act.Precision.of(bf16, fsdp=casts_itself)


def _shape(cfg: Config, dims: ParallelDims, micro_batch: int, setting: Setting) -> act.Shape:
    p, kernels = cfg.parallel, cfg.model.kernels
    sp = p.sequence_parallel if p.sequence_parallel is not None else True
    # Triton runs on GPUs only (the references run elsewhere); compiled ops and compiled blocks
    # save about what the fused kernels save.
    fused_ops = (kernels == "triton" and setting.cuda) or kernels == "compile" or p.compile
    fused_loss = dims.tp > 1 or kernels == "triton"
    tokens = micro_batch * cfg.data.seq_len // dims.cp
    return act.Shape(tokens, dims.tp, sp, dims.cp, fused_ops, fused_loss)


def _rope_bytes(cfg: Config) -> int:
    assert cfg.model.head_dim is not None
    return 2 * cfg.model.max_seq_len * (cfg.model.head_dim // 2) * FP32


def _torch_rank(
    cfg: Config, dims: ParallelDims, setting: Setting, share: RankShare
) -> MemoryEstimate:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    ep = expert_parallel(cfg)
    shards = fsdp_shards(dims, p.engine, ep)
    fsdp = uses_fsdp(cfg, dims)
    prec = precision(cfg, dims, setting)
    local_batch = t.global_batch_size // dims.dp
    if dims.pp > 1:
        num_micro = pipeline_microbatches(cfg, dims)
        micro = local_batch // num_micro
    else:
        micro = t.micro_batch_size
        num_micro = local_batch // micro
    shape = _shape(cfg, dims, micro, setting)

    est = MemoryEstimate(pp_rank=share.pp_rank)
    master = share.shard_numel(shards) * FP32
    # the MoE blocks' expert_bias and tokens_per_expert buffers (fp32, never sharded)
    moe_buffers = share.moe_blocks * 2 * m.moe.num_experts * FP32
    est.params = master + len(share.stages) * _rope_bytes(cfg) + moe_buffers
    est.optimizer = 2 * master + FP32 * share.num_tensors()
    if dims.pp > 1:
        est.buffers = _pipeline_buffers(cfg, shape, prec, share, num_micro)
    padded = share.padded_numel(shards)  # unsharded, as FSDP2 gathers it (padded)
    kinds = [q for q, _ in share.groups[:-1]]  # one parameter list per kind of block
    largest_block = max((padded_numel(q, shards) for q in kinds), default=0)
    root_padded = padded_numel(share.root, shards)
    head = act.head(m, shape, prec) if share.has_head else act.HeadActivations(0, 0, 0)

    # Activations: one micro-batch of each stage of this rank, times the micro-batches in flight.
    stages = []
    done_blocks = 0
    cache: dict[tuple[int, bool], act.Block] = {}

    def block_at(i: int, params: list[Param]) -> act.Block:
        """Block i's activations: the same for every block of its kind (its parameter list)
        and checkpointing."""
        key = (id(params), i % p.ac_every == 0)
        if key not in cache:
            cache[key] = act.block(m, shape, prec, i, p.activation_checkpointing, p.ac_every, ep)
        return cache[key]

    for stage, first, count, k in zip(share.stages, share.first_block, share.blocks, _in_flight(
        cfg, dims, share, num_micro
    )):  # fmt: skip
        params = share.block[done_blocks : done_blocks + count]
        blocks = [block_at(first + j, q) for j, q in enumerate(params)]
        done_blocks += count
        ends = (shape.tokens * 8 if stage == 0 else 0) + (
            head.saved if stage == share.num_stages - 1
            else _boundary(cfg, shape, prec) if dims.pp > 1 else 0  # the stage output, kept
        )  # fmt: skip
        stages.append((blocks, params, ends, k))
    saved = sum(k * (sum(b.saved for b in blocks) + ends) for blocks, _, ends, k in stages)

    # Gradients: kept for the whole backward (FSDP under pipelining, or accumulation), made by
    # the running block (unsharded, compute dtype, under FSDP), and left by finished blocks.
    # FSDP reducing after every micro-batch: the sharded gradients of every parameter from the
    # first micro-batch's reduction on
    every = p.reduce_every_microbatch and fsdp_accumulates(cfg, dims)
    if fsdp:
        keep = dims.pp > 1 or (num_micro > 1 and not every)  # no reduction before the last
        kept = padded * FP32 if keep else master if every else 0
        done_by = {id(q): 0 if keep or every else _shard_numel(q, shards) * FP32 for q in kinds}
        running = {id(q): padded_numel(q, shards) * prec.gathered_param for q in kinds}
        if every:  # the block's reduce-scatter output, added to the gradient it already has
            running = {id(q): running[id(q)] + _shard_numel(q, shards) * FP32 for q in kinds}
        # root group and two blocks (the running one and the next, gathered ahead), or all of
        # them under pipelining (the schedule does not reshard between micro-batches)
        gathered = (root_padded + 2 * largest_block) * prec.gathered_param
        if dims.pp > 1:
            gathered = padded * prec.gathered_param
    else:
        # DDP's gradients are views into its buckets, which live for the whole run
        keep = dims.pp > 1 or num_micro > 1 or dims.dp_replicate > 1
        kept = share.numel() * FP32 if keep else 0
        done_by = {id(q): 0 if keep else sum(x.numel for x in q) * FP32 for q in kinds}
        running = {id(q): 0 for q in kinds}

        gathered = share.numel() * prec.gathered_param if prec.autocast else 0
    head_grads = 0 if keep or every else sum(
        q.shard_numel(shards.of(q)) if fsdp else q.numel
        for q in share.root if q.name != "tok_embeddings"
    ) * FP32  # fmt: skip
    step_grads = master  # at the optimizer step: every gradient, sharded
    in_backward = gathered  # gathered while the blocks' backward runs
    if p.engine == "deepspeed":  # data parallel only (check_layout): eurotrain/plan/zero.py
        z = zero.zero_memory(cfg, share, dims.dp, prec, num_micro)
        est.params, est.optimizer, est.buffers = z.params, z.optimizer, z.buckets
        kept, gathered, step_grads, head_grads = z.grads, z.gathered, z.step_grads, 0
        in_backward = z.gathered_in_backward
        done_by = {id(q): 0 for q in kinds}
        running = {id(q): z.running for q in kinds}
        if z.keeps_grads and not kept:  # ZeRO-1, one micro-batch: they pile up in backward
            done_by = {id(q): sum(x.numel for x in q) * prec.compute for q in kinds}
            head_grads = sum(
                q.numel for q in share.root if q.name != "tok_embeddings"
            ) * prec.compute  # fmt: skip

    if dims.pp > 1 and p.pp_schedule in schedules.SIMULATED:
        try:
            return max(
                replace(est, grads=step_grads),  # the optimizer step
                _from_order(cfg, dims, share, est, stages, head, shape, prec, num_micro, kept,
                            running, gathered),
                key=lambda e: e.model_bytes,
            )  # fmt: skip
        except schedules.OrderUnavailable as e:
            if p.pp_schedule in schedules.ZERO_BUBBLE:
                raise ConfigError(
                    f"parallel.pp_schedule = {p.pp_schedule}: {e}, so the planner cannot model "
                    f"its memory; plan with pp_schedule 1f1b or interleaved_1f1b"
                ) from e
            # interleaved 1F1B: the warm-up count of micro-batches in flight, below (within
            # 10 % where measured, without the sends kept to the step's end)
    phases = [
        # the optimizer step: every gradient, sharded
        replace(est, grads=step_grads),
        # the loss's forward and the start of backward, with the loss's temporaries
        replace(est, activations=saved - head.saved, grads=kept, gathered=gathered,
                loss=head.saved + max(head.forward_peak, head.backward_peak)),
    ]  # fmt: skip
    # the backward of each block of the stage with the most activations (of the micro-batch
    # being processed): its recomputation and gradient temporaries, the gradients so far
    blocks, params, ends, _ = max(stages, key=lambda s: sum(b.saved for b in s[0]) + s[2])
    others = saved - sum(b.saved for b in blocks) - ends
    done = head_grads
    upto = list(accumulate(b.saved for b in blocks))  # saved by blocks 0..j
    worst, worst_bytes = None, -1
    for j in reversed(range(len(blocks))):
        # only the busiest block's phase is built: a model has up to ~100 blocks per rank
        phase = (others + upto[j], kept + done + running[id(params[j])],
                 blocks[j].recompute + blocks[j].workspace)  # fmt: skip
        if sum(phase) > worst_bytes:
            worst, worst_bytes = phase, sum(phase)
        done += done_by[id(params[j])]
    if worst is not None:
        acts, grads, workspace = worst
        phases.append(replace(
            est, activations=acts, grads=grads, gathered=in_backward, workspace=workspace
        ))  # fmt: skip
    return max(phases, key=lambda e: e.model_bytes)


def _from_order(
    cfg: Config,
    dims: ParallelDims,
    share: RankShare,
    est: MemoryEstimate,
    stages: list[tuple[list[act.Block], list[list[Param]], int, int]],
    head: act.HeadActivations,
    shape: act.Shape,
    prec: act.Precision,
    num_micro: int,
    grads: int,
    running: dict[int, int],
    gathered: int,
) -> MemoryEstimate:
    """The peak of a multi-stage schedule (eurotrain/plan/schedules.py): this rank's actions in
    PyTorch's order, each stage's micro-batches holding their activations from F to B (or W),
    the zero-bubble schedules' gradients kept from I to W, and every send until the step's end."""
    m, p = cfg.model, cfg.parallel
    zero_bubble = p.pp_schedule in schedules.ZERO_BUBBLE
    if zero_bubble and m.moe.enabled:
        raise ConfigError(
            f"parallel.pp_schedule = {p.pp_schedule}: the planner does not model the zero-bubble "
            f"schedules' memory for a mixture of experts (not measured); plan with pp_schedule "
            f"1f1b or interleaved_1f1b"
        )
    boundary = _boundary(cfg, shape, prec)
    last = share.num_stages - 1

    def remote(stage: int) -> bool:
        return schedules.stage_rank(p.pp_schedule, dims.pp, stage) != share.pp_rank

    by_stage = {}
    for stage, (blocks, params, _, _) in zip(share.stages, stages):
        is_last = stage == last
        ids = shape.tokens * 8 if stage == 0 else 0
        # the stage's output: sent (alive until the step's end), or handed to the next stage on
        # this rank, which keeps it in place of its receive buffer (counted in ``buffers``)
        sends_output = not is_last and remote(stage + 1)
        saved = ids + sum(b.saved for b in blocks) + (head.saved if is_last else 0)
        # B: the loss's start on the last stage, then each block's backward (the blocks before
        # it still saved, its recomputation, its temporaries and, under FSDP, its gradient)
        upto = list(accumulate(b.saved for b in blocks))
        backward = max(
            [saved + head.backward_peak if is_last else 0]
            + [ids + upto[j] + b.recompute + b.workspace + running[id(params[j])]
               for j, b in enumerate(blocks)]
        )  # fmt: skip
        kept_for_w = input_backward = 0
        if zero_bubble:
            kept_for_w = len(blocks) * schedules.block_weight_grad_inputs(m, shape, prec)
            if is_last:
                kept_for_w += schedules.head_weight_grad_inputs(m, shape, prec)
            input_backward = max(
                schedules.block_input_backward_temporary(m, shape, prec),
                head.backward_peak - kept_for_w if is_last else 0,
            )
        by_stage[stage] = schedules.StageBytes(
            saved=saved,
            forward=head.forward_peak if is_last else 0,
            backward=backward,
            kept_for_w=kept_for_w,
            input_backward=input_backward,
            sent_forward=boundary if sends_output else 0,
            sent_backward=boundary if stage > 0 and remote(stage - 1) else 0,
        )
    order = schedules.rank_order(
        p.pp_schedule, dims.pp, num_micro, len(share.stages), share.pp_rank
    )
    # W: one parameter group's weight gradient at a time, before it is added to .grad
    largest = max((q.numel for params, _ in share.groups for q in params), default=0)
    top = schedules.peak(order, by_stage, largest * prec.gathered_param)
    return replace(
        est,
        activations=top.activations,
        buffers=est.buffers + top.sent,
        grads=grads,
        gathered=gathered,
        workspace=top.kept_for_w + top.temporaries,
    )


def _shard_numel(params: list[Param], shards: Shards) -> int:
    return sum(q.shard_numel(shards.of(q)) for q in params)


def _boundary(cfg: Config, shape: act.Shape, prec: act.Precision) -> int:
    """One micro-batch of hidden states at a stage boundary (sequence-sharded under SP)."""
    return shape.residual_rows * cfg.model.dim * prec.residual


def _pipeline_buffers(
    cfg: Config, shape: act.Shape, prec: act.Precision, share: RankShare, num_micro: int
) -> int:
    """One receive buffer per micro-batch: activations into every stage but the first,
    gradients into every stage but the last (torch.distributed.pipelining, made once)."""
    per = _boundary(cfg, shape, prec)
    count = sum((s > 0) + (s < share.num_stages - 1) for s in share.stages)
    return count * num_micro * per


def _in_flight(cfg: Config, dims: ParallelDims, share: RankShare, num_micro: int) -> list[int]:
    """Micro-batches whose activations each of this rank's stages holds at once."""
    if dims.pp == 1:
        return [1]
    pp, rank, sched = dims.pp, share.pp_rank, cfg.parallel.pp_schedule
    if sched == "gpipe":
        return [num_micro]
    if sched == "1f1b":
        return [min(num_micro, pp - rank)]
    # interleaved 1F1B (where PyTorch's order cannot be read: eurotrain/plan/schedules.py):
    # forwards before the first backward, round-robin over the rank's stages in groups of one
    # round's micro-batches
    v = len(share.stages)
    rounds = max(1, num_micro // pp)
    per_round = num_micro // rounds
    warmup = min((v - 1) * per_round + 2 * (pp - 1 - rank), num_micro * v) + 1
    counts = [0] * v
    for op in range(min(warmup, num_micro * v)):
        counts[(op // per_round) % v] += 1
    return [min(c, num_micro) for c in counts]
