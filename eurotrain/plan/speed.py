"""Step time of one layout: compute from FLOPs, the communication the code does and how much of
it the code overlaps, and the pipeline bubble (docs/planner.md states every assumption).

- Compute: the model's FLOPs (models/config.py flops_per_token: 6 N + attention) plus what
  activation checkpointing recomputes (a block's forward, a third of its training FLOPs, under
  "full"; "selective" recomputes element-wise ops, counted as free, and in MoE blocks the routed
  experts' grouped matmuls, which it does not keep), at peak x efficiency; MoE FLOPs count the
  active parameters (the top_k experts a token passes through).
- Tensor parallelism with sequence parallelism: per block and micro-batch, two all-gathers and
  two reduce-scatters of the [tokens, dim] activations in forward and again in backward, on the
  node's links, not overlapped (plain DTensor TP, no asynchronous TP).
- Context parallelism (Ulysses): all-to-alls of q, k, v and the attention output in forward and
  of their gradients in backward, not overlapped.
- FSDP2: the blocks' parameters all-gathered (bf16) per micro-batch in forward and again in
  backward (reshard_after_forward; once per step under pipelining), gradients reduce-scattered
  (fp32) after the last micro-batch (after each with parallel.reduce_every_microbatch, as
  the replicas' all-reduce then is too); prefetching overlaps them with compute, so only what
  exceeds the compute, plus the first block's gather, shows.
- Replicas (HSDP's replicate axis, DDP): gradients all-reduced
  (fp32) during backward, overlapped with it the same way.
- DeepSpeed ZeRO (data parallel only): ZeRO-1 reduce-scatters the gradients once per step,
  ZeRO-2 at every micro-batch, and both all-gather the updated parameters after the step, not
  overlapped (DeepSpeed's overlap_comm is off for them); ZeRO-3 gathers and reduce-scatters as
  FSDP2 does, overlapped.
- Expert parallelism: per MoE block and micro-batch, four all-to-alls (dispatch and combine,
  forward and backward) of the [tokens x top_k, dim] rows, (ep - 1) / ep of them leaving the
  rank, not overlapped, with a balanced load; on the node's links when the ep group fits in a
  node (ep is the inner part of dp_shard: the group spans tp x cp x ep consecutive ranks), at
  the profile's per-GPU inter-node bandwidth otherwise (every rank sends at once).
- Pipelines: the bubble (p - 1) / m for 1F1B and GPipe; for the multi-stage schedules from
  running PyTorch's order of every rank's actions with a forward taking 1 and a backward 2
  (3 under full checkpointing), split evenly into the zero-bubble schedules' I and W: that gives
  (p - 1) / (v m) for interleaved 1F1B, as the formula, and a third of it for the zero-bubble
  schedules ((p - 1) / (3 v m) with their 2 stages per rank); point-to-point transfers are
  neglected.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from eurotrain.config import Config
from eurotrain.parallel.checks import accumulation_steps, pipeline_microbatches
from eurotrain.parallel.dims import ParallelDims
from eurotrain.plan import moe, schedules
from eurotrain.plan.hardware import Hardware
from eurotrain.plan.memory import fsdp_accumulates
from eurotrain.plan.shapes import Param, expert_parallel, fsdp_shards, rank_shares

GB = 1e9
BF16, FP32 = 2, 4


@dataclass
class StepTime:
    compute_s: float
    tp_s: float
    cp_s: float
    ep_s: float
    """Expert parallelism's all-to-alls."""
    dp_s: float
    """Exposed FSDP / replica communication (after overlap)."""
    bubble_s: float
    tokens: int
    """Tokens per step (all ranks)."""
    model_flops: float
    """Model FLOPs per step (all ranks), recomputation excluded: MFU's numerator."""
    hardware_flops: float
    """FLOPs executed per step (all ranks), recomputation included."""

    @property
    def total_s(self) -> float:
        return self.compute_s + self.tp_s + self.cp_s + self.ep_s + self.dp_s + self.bubble_s


def _recompute_fraction(cfg: Config) -> float:
    p = cfg.parallel
    if p.activation_checkpointing != "full":
        return 0.0
    m = cfg.model
    checkpointed = len(range(0, m.num_layers, p.ac_every)) / m.num_layers
    return checkpointed / 3  # one more forward of the blocks: 2 of their 6 N FLOPs


def _selective_expert_flops(cfg: Config) -> float:
    """Per token: selective checkpointing keeps the outputs of mm, addmm, bmm and attention
    (eurotrain/parallel/ac.py), not of the experts' grouped matmuls, so the backward of each
    checkpointed MoE block runs its routed experts' forward again (2 FLOPs per active weight)."""
    p, m = cfg.parallel, cfg.model
    if p.activation_checkpointing != "selective" or not m.moe.enabled:
        return 0.0
    blocks = sum(m.is_moe_layer(i) for i in range(0, m.num_layers, p.ac_every))
    return blocks * 2 * m.moe.top_k * 3 * m.dim * m.expert_ffn_dim


def _group(hw: Hardware, inner: int, size: int) -> tuple[int, bool]:
    """(members per node, whether it spans nodes) of a mesh axis of ``size`` whose inner axes
    (closer to tp, the innermost) multiply to ``inner``."""
    gpn = hw.gpus_per_node
    spans = inner * size > gpn
    per_node = max(1, min(size, gpn // inner)) if spans else size
    return per_node, spans


def step_time(
    cfg: Config, dims: ParallelDims, hw: Hardware, extra_flops_per_token: float = 0.0
) -> StepTime:
    """``extra_flops_per_token``: FLOPs a runtime executes per token beyond the model's and
    eurotrain's recomputation, to price another framework's checkpointing policy when comparing
    with its published runs (benchmarks/plan_anchors.py)."""
    m, t = cfg.model, cfg.train
    seq = cfg.data.seq_len
    tokens = t.global_batch_size * seq
    per_token = m.flops_per_token(seq)
    model_flops = per_token * tokens
    blocks_share = 1 - m.vocab_size * m.dim * 6 / max(1.0, per_token)
    hw_flops = model_flops * (1 + _recompute_fraction(cfg) * blocks_share)
    hw_flops += (_selective_expert_flops(cfg) + extra_flops_per_token) * tokens
    rate = hw.peak_tflops * 1e12 * hw.efficiency
    compute = hw_flops / dims.world_size / rate

    # tokens one rank's blocks see per step (its data-parallel share, split by cp)
    local_tokens = tokens // dims.dp // dims.cp
    layers = max(s.num_blocks for s in rank_shares(cfg, dims))
    act = BF16 if hw.peak_tflops else FP32

    tp_s = 0.0
    if dims.tp > 1:
        volume = 8 * layers * local_tokens * m.dim * act * (dims.tp - 1) / dims.tp
        tp_s = volume / (hw.intra_GBps * GB)
    cp_s = 0.0
    if dims.cp > 1:
        assert m.head_dim is not None and m.num_kv_heads is not None
        width = (2 * m.num_heads + 2 * m.num_kv_heads) * m.head_dim // dims.tp
        volume = 2 * layers * local_tokens * width * act * (dims.cp - 1) / dims.cp
        per_node, spans = _group(hw, dims.tp, dims.cp)
        cp_s = volume / (hw.bus_GBps(per_node, spans) * GB)

    ep_s = _expert_parallel(cfg, dims, hw, local_tokens, act)
    dp_s = _data_parallel_exposed(cfg, dims, hw, compute)
    bubble = _bubble(cfg, dims) * (compute + tp_s + cp_s + ep_s)
    return StepTime(compute, tp_s, cp_s, ep_s, dp_s, bubble, tokens, model_flops, hw_flops)


def _expert_parallel(
    cfg: Config, dims: ParallelDims, hw: Hardware, local_tokens: int, dtype_bytes: int
) -> float:
    """The all-to-alls of the busiest pipeline rank's MoE blocks over a step."""
    ep = expert_parallel(cfg)
    if ep == 1:
        return 0.0
    layers = max(s.moe_blocks for s in rank_shares(cfg, dims))
    volume = layers * moe.all_to_all_bytes(cfg.model, local_tokens, ep, dtype_bytes)
    _, spans = _group(hw, dims.tp * dims.cp, ep)
    return volume / ((hw.inter_GBps if spans else hw.intra_GBps) * GB)


def _data_parallel_exposed(cfg: Config, dims: ParallelDims, hw: Hardware, compute: float) -> float:
    """Exposed time of FSDP's gathers and reduce-scatters and of the replicas' all-reduce."""
    p = cfg.parallel
    if p.engine == "deepspeed":
        return _zero_exposed(cfg, dims, hw, compute)
    share = max(rank_shares(cfg, dims), key=lambda s: s.numel())
    shards = fsdp_shards(dims, "fsdp", expert_parallel(cfg))
    groups = share.groups  # this rank's parameters after tp, pp and ep
    replicas = dims.dp_replicate
    micro = accumulation_steps(cfg, dims)
    # gradients are reduced once per step, or after every micro-batch where FSDP is asked to
    every = p.reduce_every_microbatch and fsdp_accumulates(cfg, dims)
    reductions = micro if every else 1
    busy = 0.0
    gather_first = 0.0
    if shards.dense > 1:
        per_node, spans = _group(hw, dims.tp, shards.dense)
        bw = hw.bus_GBps(per_node, spans) * GB
        # each kind over its own shard group (the experts' is smaller under ep), on the links
        # of the dense group
        moved = sum(n * q.numel * (shards.of(q) - 1) / shards.of(q) for q, n in _each(groups))
        # a pipeline schedule gathers once per step and never reshards in between
        gathers = 1 if dims.pp > 1 else micro * (2 if p.reshard_after_forward else 1)
        gather = moved * BF16 / bw
        busy += gathers * gather + reductions * moved * FP32 / bw  # + the reduce-scatters
        gather_first = gather / max(1, share.num_blocks)
    if replicas > 1:
        inner = dims.tp * dims.cp * dims.dp_shard
        per_node, spans = _group(hw, inner, replicas)
        bw = hw.bus_GBps(per_node, spans) * GB
        sharded = sum(n * q.numel / shards.of(q) for q, n in _each(groups))
        busy += reductions * 2 * sharded * FP32 * (replicas - 1) / replicas / bw
    return gather_first + max(0.0, busy - compute)


def _zero_exposed(cfg: Config, dims: ParallelDims, hw: Hardware, compute: float) -> float:
    """DeepSpeed ZeRO with its defaults (data parallel only): ZeRO-1 reduce-scatters the
    gradients once per step (at the last micro-batch), ZeRO-2 at every micro-batch, both then
    all-gather the updated parameters, none of it overlapped (``overlap_comm`` is off for
    stages 1 and 2); ZeRO-3 gathers the parameters in forward and again in backward and
    reduce-scatters the gradients at every micro-batch, overlapped (``overlap_comm`` on) as
    FSDP's are. All in the compute dtype, over the data-parallel ranks."""
    if dims.dp == 1:
        return 0.0
    stage = cfg.parallel.zero_stage
    micro = accumulation_steps(cfg, dims)
    c = BF16 if hw.peak_tflops else FP32
    per_node, spans = _group(hw, 1, dims.dp)
    bw = hw.bus_GBps(per_node, spans) * GB
    one = cfg.model.num_params() * c * (dims.dp - 1) / dims.dp / bw  # one pass over the model
    if stage == 1:
        return 2 * one
    if stage == 2:
        return (micro + 1) * one
    busy = 3 * micro * one
    return one / max(1, cfg.model.num_layers) + max(0.0, busy - compute)


def _each(groups: list[tuple[list[Param], int]]) -> Iterator[tuple[Param, int]]:
    """Every parameter of ``RankShare.groups`` with how many times the rank holds it."""
    return ((q, n) for params, n in groups for q in params)


def _bubble(cfg: Config, dims: ParallelDims) -> float:
    """Idle time of the pipeline as a fraction of its busy time."""
    if dims.pp == 1:
        return 0.0
    p = cfg.parallel
    micro = pipeline_microbatches(cfg, dims)
    if p.pp_schedule in schedules.SIMULATED:
        # from PyTorch's order of every rank's actions (a backward twice a forward, three
        # times under full checkpointing; eurotrain/plan/schedules.py)
        backward = 3.0 if p.activation_checkpointing == "full" else 2.0
        try:
            return schedules.bubble(p.pp_schedule, dims.pp, micro, p.stages_per_rank(), backward)
        except schedules.OrderUnavailable:
            pass
    if p.pp_schedule in schedules.ZERO_BUBBLE:
        return (dims.pp - 1) / (3 * micro)
    if p.pp_schedule == "interleaved_1f1b":
        return (dims.pp - 1) / (p.pp_virtual_stages * micro)
    return (dims.pp - 1) / micro


@dataclass
class Throughput:
    step_s: float
    tokens_per_s_per_gpu: float
    tflops_per_gpu: float
    """Model FLOPs (MFU's convention)."""
    hardware_tflops_per_gpu: float
    """Executed FLOPs, recomputation included (what Megatron's papers report)."""
    mfu: float
    steps: int
    days: float
    gpu_hours: float
    node_hours: float


def throughput(st: StepTime, dims: ParallelDims, hw: Hardware, steps: int) -> Throughput:
    gpus = dims.world_size
    tps = st.tokens / st.total_s / gpus
    tflops = st.model_flops / st.total_s / gpus / 1e12
    seconds = steps * st.total_s
    return Throughput(
        step_s=st.total_s,
        tokens_per_s_per_gpu=tps,
        tflops_per_gpu=tflops,
        hardware_tflops_per_gpu=st.hardware_flops / st.total_s / gpus / 1e12,
        mfu=tflops / hw.peak_tflops if hw.peak_tflops else 0.0,
        steps=steps,
        days=seconds / 86400,
        gpu_hours=seconds * gpus / 3600,
        node_hours=seconds * gpus / hw.gpus_per_node / 3600,
    )
