"""check_layout(): everything about a parallel layout that can be wrong, checked before any model
is built, as a function of (config, world size) so that each case is a cheap test.

Every error names the values that do not fit and a layout (or setting) that would.
check_compile(): a CPU run that compiles where torch.compile cannot build its C++.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch

from eurotrain.configtools import ConfigError, divisors
from eurotrain.parallel.ac import inductor_cpu_problem
from eurotrain.parallel.config import VIRTUAL_STAGE_SCHEDULES, ZERO_BUBBLE_SCHEDULES
from eurotrain.parallel.dims import ParallelDims

if TYPE_CHECKING:
    from eurotrain.config import Config


def _fits(value: int, candidates: list[int]) -> str:
    return ", ".join(str(d) for d in candidates if value % d == 0) or "1"


def check_layout(cfg: Config, world_size: int, cuda: bool | None = None) -> ParallelDims:
    """Resolve the degrees against ``world_size`` and check the model, data and engine fit them.

    ``cuda``: whether the run will be on GPUs (default: train.device and what torch sees)."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    dims = ParallelDims.from_config(p, world_size)
    if cuda is None:
        cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    assert m.num_kv_heads is not None and m.head_dim is not None

    if dims.tp > 1:
        for name, value in (
            ("model.num_heads", m.num_heads),
            ("model.num_kv_heads", m.num_kv_heads),
            ("model.ffn_dim", m.ffn_dim),
            ("model.vocab_size", m.vocab_size),
        ):
            if value % dims.tp:
                raise ConfigError(
                    f"parallel.tp = {dims.tp} does not divide {name} = {value}: tensor "
                    f"parallelism splits it across the tp ranks. Use parallel.tp in "
                    f"{{{_fits(value, divisors(world_size))}}} (the rest to parallel.dp_shard)"
                )

    per_step = t.micro_batch_size * dims.dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel ranks ({dims.dp}) = "
            f"{per_step}; for example set train.global_batch_size to "
            f"{per_step * max(1, round(t.global_batch_size / per_step))}, or change the number "
            f"of ranks"
        )

    if p.fsdp_cpu_offload and not cuda:
        raise ConfigError(
            "parallel.fsdp_cpu_offload moves FSDP shards from the GPU to pinned CPU memory; on a "
            "CPU run everything is in CPU memory already: set parallel.fsdp_cpu_offload = false"
        )

    if dims.pp > 1:
        _check_pipeline(cfg, dims)

    if dims.cp > 1:
        _check_context(cfg, dims, cuda)

    if t.eval_interval and (dims.pp > 1 or dims.cp > 1):
        raise ConfigError(
            f"train.eval_interval = {t.eval_interval} with parallel.pp = {dims.pp} / parallel.cp "
            f"= {dims.cp}: validation runs without pipeline or context parallelism for now; "
            f"set train.eval_interval = 0 or use data/tensor parallelism"
        )

    if dims.ep > 1:
        _check_expert_parallel(cfg, dims)

    if m.moe.enabled:
        _check_moe(cfg, dims)

    if p.engine == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                "parallel.engine = deepspeed but DeepSpeed is not installed: "
                "`pip install --no-build-isolation deepspeed` (after torch), or set "
                "parallel.engine = fsdp"
            )
        others = {k: v for k, v in (("tp", dims.tp), ("pp", dims.pp), ("cp", dims.cp)) if v > 1}
        if others:
            names = ", ".join(f"parallel.{k} = {v}" for k, v in others.items())
            raise ConfigError(
                f"parallel.engine = deepspeed runs data parallelism (ZeRO) only, not {names}: "
                f"use parallel.engine = fsdp for tensor/pipeline/context parallelism, or "
                f"parallel.dp_shard = {world_size} with DeepSpeed"
            )
        if dims.dp_replicate > 1:
            raise ConfigError(
                f"parallel.engine = deepspeed has no replicate axis (parallel.dp_replicate = "
                f"{dims.dp_replicate}); use parallel.dp_shard = {world_size}"
            )
    if p.reduce_every_microbatch:
        _check_reduce_every(cfg, dims)
    return dims


def _check_reduce_every(cfg: Config, dims: ParallelDims) -> None:
    """parallel.reduce_every_microbatch is FSDP2's: refused where another part reduces the
    gradients its own way. Where nothing is sharded (one process, replicas only under DDP) it
    changes nothing, so a config keeps working on a smaller layout."""
    if cfg.parallel.engine == "deepspeed":
        why = "DeepSpeed reduces as its ZeRO stage says (2 and 3: after every micro-batch)"
    elif dims.pp > 1:
        why = f"parallel.pp = {dims.pp}: the pipeline schedule reduces once per step"
    else:
        return
    raise ConfigError(f"parallel.reduce_every_microbatch = true: {why}; leave it false")


def _check_moe(cfg: Config, dims: ParallelDims) -> None:
    p, m = cfg.parallel, cfg.model
    if p.engine == "deepspeed":
        raise ConfigError(
            f"model.moe.num_experts = {m.moe.num_experts} with parallel.engine = deepspeed is not "
            f"supported (eurotrain's experts run on PyTorch's own stack): use parallel.engine = "
            f"fsdp, or model.moe.num_experts = 0"
        )
    if dims.tp > 1 and m.expert_ffn_dim % dims.tp:
        raise ConfigError(
            f"parallel.tp = {dims.tp} does not divide the experts' hidden size "
            f"model.moe.expert_ffn_dim = {m.expert_ffn_dim}: tensor parallelism splits it across "
            f"the tp ranks; use parallel.tp in "
            f"{{{_fits(m.expert_ffn_dim, divisors(dims.world_size))}}}"
        )


def _check_expert_parallel(cfg: Config, dims: ParallelDims) -> None:
    """parallel.ep: experts split across a sub-axis of dp_shard (eurotrain/parallel/ep.py)."""
    p, m = cfg.parallel, cfg.model
    if p.engine == "deepspeed":
        raise ConfigError(
            f"parallel.ep = {dims.ep} with parallel.engine = deepspeed is not supported (DeepSpeed "
            f"runs data parallelism only): use parallel.engine = fsdp, or parallel.ep = 1"
        )
    if not m.moe.enabled:
        raise ConfigError(
            f"parallel.ep = {dims.ep} needs a mixture-of-experts model but model.moe.num_experts "
            f"= 0 (every block dense): set parallel.ep = 1, or model.moe.num_experts > 0"
        )
    if dims.dp_shard % dims.ep:
        raise ConfigError(
            f"parallel.ep = {dims.ep} does not divide parallel.dp_shard = {dims.dp_shard}: expert "
            f"parallelism splits the dp_shard ranks into groups of ep; use parallel.ep in "
            f"{{{_fits(dims.dp_shard, divisors(dims.dp_shard))}}}"
        )
    if p.activation_checkpointing == "selective":
        # The experts are an FSDP module of their own inside the checkpointed block: in the
        # recomputation (during backward) FSDP takes it for a forward root and records more
        # profiler ranges than in forward, which selective checkpointing rejects as a
        # different op sequence. Full checkpointing replays without that check.
        raise ConfigError(
            f"parallel.activation_checkpointing = selective with parallel.ep = {dims.ep} is not "
            f"supported yet: use activation_checkpointing full (or none), or parallel.ep = 1"
        )
    if m.moe.num_experts % dims.ep:
        raise ConfigError(
            f"parallel.ep = {dims.ep} does not divide model.moe.num_experts = "
            f"{m.moe.num_experts}: each ep rank holds an equal share of the experts; use "
            f"parallel.ep in {{{_fits(m.moe.num_experts, divisors(dims.dp_shard))}}}"
        )


def _check_pipeline(cfg: Config, dims: ParallelDims) -> None:
    p, m, t = cfg.parallel, cfg.model, cfg.train
    num_stages = dims.pp * p.stages_per_rank()
    if m.tie_embeddings:
        # Even ZBV, which puts the first and the last stage on pp rank 0, runs them as two
        # stage modules that FSDP shards and the schedule differentiates separately.
        raise ConfigError(
            f"model.tie_embeddings with parallel.pp = {dims.pp} is not supported: the embedding "
            f"(first pipeline stage) and the output projection (last stage) are separate stage "
            f"modules, and nothing keeps one weight shared between them. Use parallel.pp = 1 "
            f"(tied embeddings work with dp_shard, dp_replicate, tp, cp and DeepSpeed), or set "
            f"model.tie_embeddings = false to train the two matrices apart"
        )
    if p.pp_schedule in ZERO_BUBBLE_SCHEDULES and p.activation_checkpointing != "none":
        # The split backward runs a block's backward twice (inputs, then weights): selective
        # checkpointing refuses the second ("Trying to backward an extra time"), and full
        # checkpointing would recompute the block for each pass and keep what it was to free.
        raise ConfigError(
            f"parallel.pp_schedule = {p.pp_schedule} with parallel.activation_checkpointing = "
            f"{p.activation_checkpointing} is not supported: zero-bubble schedules run each "
            f"block's backward in two passes, which activation checkpointing does not allow; use "
            f"pp_schedule 1f1b or interleaved_1f1b with checkpointing, or activation_checkpointing "
            f"none with {p.pp_schedule}"
        )
    if p.pp_schedule in VIRTUAL_STAGE_SCHEDULES and p.pp_virtual_stages < 2:
        raise ConfigError(
            f"parallel.pp_schedule = {p.pp_schedule} needs parallel.pp_virtual_stages >= 2 "
            f"(it is {p.pp_virtual_stages}); or use pp_schedule 1f1b"
        )
    if m.num_layers < num_stages:
        raise ConfigError(
            f"model.num_layers = {m.num_layers} is fewer than the {num_stages} pipeline stages "
            f"(parallel.pp = {dims.pp} x {p.stages_per_rank()} stage(s) per rank): use "
            f"parallel.pp <= {max(1, m.num_layers // p.stages_per_rank())} or fewer virtual stages"
        )
    if p.pp_layers is not None and (
        len(p.pp_layers) != num_stages or sum(p.pp_layers) != m.num_layers
    ):
        raise ConfigError(
            f"parallel.pp_layers = {p.pp_layers} must list {num_stages} stage sizes summing to "
            f"model.num_layers = {m.num_layers}, for example {balanced_split(m.num_layers, num_stages)}"
        )
    local_batch = t.global_batch_size // dims.dp
    micro = pipeline_microbatches(cfg, dims)
    if local_batch % micro:
        raise ConfigError(
            f"parallel.pp_microbatches = {micro} does not divide the {local_batch} sequences each "
            f"data-parallel rank gets per step (train.global_batch_size / dp); use one of "
            f"{divisors(local_batch)}"
        )
    if micro < dims.pp:
        raise ConfigError(
            f"{micro} pipeline micro-batches are fewer than the parallel.pp = {dims.pp} pipeline "
            f"ranks: set parallel.pp_microbatches >= {dims.pp} (and a divisor of {local_batch})"
        )
    if p.pp_schedule == "interleaved_zb" and micro % dims.pp:
        raise ConfigError(
            f"parallel.pp_schedule = interleaved_zb needs parallel.pp_microbatches ({micro}) to be "
            f"a multiple of parallel.pp ({dims.pp})"
        )
    if dims.cp > 1:
        raise ConfigError(
            "parallel.cp > 1 with parallel.pp > 1 is not supported yet (the RoPE positions of a "
            "sequence shard do not travel between stages); use one of them"
        )


def _check_context(cfg: Config, dims: ParallelDims, cuda: bool) -> None:
    p, m = cfg.parallel, cfg.model
    seq = cfg.data.seq_len
    assert m.num_kv_heads is not None
    if p.cp_method == "ring":
        if not cuda:
            raise ConfigError(
                f"parallel.cp_method = ring (parallel.cp = {dims.cp}) needs GPUs: PyTorch's ring "
                f"attention has no CPU kernel. Use parallel.cp_method = ulysses on CPU"
            )
        if seq % (2 * dims.cp):
            raise ConfigError(
                f"data.seq_len = {seq} must be divisible by 2 x parallel.cp = {2 * dims.cp} for "
                f"ring attention's load balancing; for example data.seq_len = "
                f"{seq - seq % (2 * dims.cp) or 2 * dims.cp}"
            )
        masked = [
            what
            for what, on in (
                ("data.document_positions (document masks)", cfg.data.document_positions),
                (f"model.sliding_window = {m.sliding_window}", m.sliding_window is not None),
            )
            if on
        ]
        if masked:
            raise ConfigError(
                f"parallel.cp_method = ring computes plain causal attention only, not "
                f"{' or '.join(masked)}: use parallel.cp_method = ulysses (whole sequences per "
                f"rank, any mask)"
            )
        return
    if seq % dims.cp:
        raise ConfigError(
            f"data.seq_len = {seq} is not divisible by parallel.cp = {dims.cp}: each cp rank "
            f"takes an equal slice; for example data.seq_len = {seq - seq % dims.cp or dims.cp}"
        )
    heads, kv = m.num_heads // dims.tp, m.num_kv_heads // dims.tp
    if heads % dims.cp or kv % dims.cp:
        raise ConfigError(
            f"parallel.cp_method = ulysses splits attention heads across cp ranks: the "
            f"{heads} query and {kv} key/value heads per tp rank (model.num_heads = "
            f"{m.num_heads}, model.num_kv_heads = {m.num_kv_heads}, parallel.tp = {dims.tp}) "
            f"must be divisible by parallel.cp = {dims.cp}; use parallel.cp in "
            f"{{{_fits(kv, divisors(kv))}}}"
        )


def balanced_split(num_layers: int, num_stages: int) -> list[int]:
    """Blocks per stage, as even as possible, the first stages taking the remainder."""
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if i < extra else 0) for i in range(num_stages)]


def accumulation_steps(cfg: Config, dims: ParallelDims) -> int:
    """Micro-batches of train.micro_batch_size each data-parallel rank runs per optimizer step."""
    return max(1, cfg.train.global_batch_size // dims.dp // cfg.train.micro_batch_size)


def pipeline_microbatches(cfg: Config, dims: ParallelDims) -> int:
    if cfg.parallel.pp_microbatches is not None:
        return cfg.parallel.pp_microbatches
    return accumulation_steps(cfg, dims)


def compile_setting(cfg: Config) -> str | None:
    """The setting that makes the run call torch.compile, as a user writes it, or None."""
    if cfg.parallel.compile:
        return "parallel.compile: true"
    return "model.kernels: compile" if cfg.model.kernels == "compile" else None


def check_compile(cfg: Config, device_type: str) -> None:
    """Refuse, before the model exists, a CPU run that compiles where compiling cannot work."""
    asked = compile_setting(cfg)
    if device_type != "cpu" or asked is None:
        return
    problem = inductor_cpu_problem()
    if problem:
        raise ConfigError(f"{asked}: {problem}; or turn compiling off")
