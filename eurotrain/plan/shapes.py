"""The parameter tensors each pipeline rank holds, after tensor parallelism, and how FSDP2
shards them: the counting the memory and speed models share.

Tensor parallelism follows eurotrain/models/plans.py: column-parallel q/k/v, w1/w3 and the
output projection split dim 0, row-parallel wo/w2 split dim 1, the vocabulary-parallel embedding
splits dim 0, norms are replicated. Pipeline stages follow eurotrain/parallel/pipeline.py: the
blocks of each stage (``pp_layers`` or balanced), the embedding on stage 0 and the final norm and
output on the last stage, the stages of a rank in "loop" order or, for ZBV, "V" order.

A mixture-of-experts block (``ModelConfig.is_moe_layer``) holds a router [E, D], the routed
experts' w1/w3 [E, F, D] and w2 [E, D, F] and optional shared experts (a dense SwiGLU of
num_shared_experts x F). Expert parallelism gives each of ``parallel.ep`` ranks E / ep experts;
FSDP2 shards those over the rest of dp_shard x cp (``Shards.expert``); tensor parallelism splits
the experts on F like the dense MLP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from eurotrain.config import Config
from eurotrain.models.config import ModelConfig
from eurotrain.parallel.checks import balanced_split
from eurotrain.parallel.dims import ParallelDims
from eurotrain.parallel.pipeline import stage_ids


@dataclass(frozen=True)
class Param:
    """One parameter as a tensor-parallel rank holds it: ``rows`` (dim 0) x ``cols`` (the rest)."""

    name: str
    rows: int
    cols: int = 1
    expert: bool = False
    """A routed expert weight: split over the ep ranks, FSDP-sharded over ``Shards.expert``."""

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    def shard_numel(self, num_shards: int) -> int:
        """Elements of one FSDP2 shard: dim 0 padded to a multiple of the shard count."""
        return math.ceil(self.rows / num_shards) * self.cols


@dataclass(frozen=True)
class Shards:
    """Ranks FSDP2 shards each kind of parameter over (1: not sharded)."""

    dense: int
    expert: int

    def of(self, p: Param) -> int:
        return self.expert if p.expert else self.dense


def expert_parallel(cfg: Config) -> int:
    """``parallel.ep`` of a mixture of experts; 1 for a dense model, whatever it says."""
    return cfg.parallel.ep if cfg.model.moe.enabled else 1


def _swiglu(prefix: str, dim: int, hidden: int) -> list[Param]:
    return [Param(f"{prefix}w1", hidden, dim), Param(f"{prefix}w3", hidden, dim),
            Param(f"{prefix}w2", dim, hidden)]  # fmt: skip


def block_params(m: ModelConfig, tp: int, moe: bool = False, ep: int = 1) -> list[Param]:
    """A dense or (``moe``) mixture-of-experts block's parameters on one tensor-parallel (and
    expert-parallel) rank."""
    assert m.head_dim is not None and m.num_kv_heads is not None
    q, kv = m.num_heads * m.head_dim // tp, m.num_kv_heads * m.head_dim // tp
    params = [
        Param("attention_norm", m.dim),
        Param("wq", q, m.dim),
        Param("wk", kv, m.dim),
        Param("wv", kv, m.dim),
        Param("wo", m.dim, q),
        Param("ffn_norm", m.dim),
    ]
    if m.qkv_bias:
        params += [Param("bq", q), Param("bk", kv), Param("bv", kv)]
    if m.qk_norm:
        params += [Param("q_norm", m.head_dim), Param("k_norm", m.head_dim)]
    if not moe:
        return params + _swiglu("", m.dim, m.ffn_dim // tp)
    e, f = m.moe.num_experts, m.expert_ffn_dim // tp
    params += [
        Param("router", e, m.dim),
        Param("experts.w1", e // ep, f * m.dim, expert=True),
        Param("experts.w3", e // ep, f * m.dim, expert=True),
        Param("experts.w2", e // ep, m.dim * f, expert=True),
    ]
    if m.moe.num_shared_experts:
        params += _swiglu("shared.", m.dim, m.moe.num_shared_experts * m.expert_ffn_dim // tp)
    return params


def embedding_params(m: ModelConfig, tp: int) -> list[Param]:
    return [Param("tok_embeddings", m.vocab_size // tp, m.dim)]


def head_params(m: ModelConfig, tp: int, tied: bool) -> list[Param]:
    """The final norm and the output projection (none when tied to the embedding)."""
    out = [] if tied else [Param("output", m.vocab_size // tp, m.dim)]
    return [Param("norm", m.dim), *out]


@dataclass
class RankShare:
    """What one pipeline rank holds: its stages and their parameters (tensor-parallel local)."""

    pp_rank: int
    stages: list[int]
    blocks: list[int]
    """Blocks per stage of this rank, in the order of ``stages``."""
    num_stages: int
    block: list[list[Param]]
    """Each block's parameters, this rank's blocks in the order of ``stages`` (MoE and dense
    blocks differ)."""
    root: list[Param]
    """Embedding, final norm and output this rank holds: FSDP's root group of its stage(s)."""
    first_block: list[int]
    """Global index of the first block of each stage, in the order of ``stages``."""
    moe_blocks: int = 0
    """Mixture-of-experts blocks among this rank's blocks."""

    @property
    def num_blocks(self) -> int:
        return sum(self.blocks)

    @property
    def has_embedding(self) -> bool:
        return 0 in self.stages

    @property
    def has_head(self) -> bool:
        return self.num_stages - 1 in self.stages

    @cached_property
    def groups(self) -> list[tuple[list[Param], int]]:
        """(parameters, how many times this rank holds them): each kind of block (blocks of a
        kind share one list), then the root group once."""
        kinds: dict[int, list[Param]] = {}
        counts: dict[int, int] = {}
        for params in self.block:
            kinds[id(params)] = params
            counts[id(params)] = counts.get(id(params), 0) + 1
        return [(params, counts[key]) for key, params in kinds.items()] + [(self.root, 1)]

    def numel(self) -> int:
        return sum(n * sum(p.numel for p in params) for params, n in self.groups)

    def shard_numel(self, shards: Shards) -> int:
        """Elements of this rank's FSDP shards (its whole share when not sharded)."""
        return sum(
            n * sum(p.shard_numel(shards.of(p)) for p in params) for params, n in self.groups
        )

    def padded_numel(self, shards: Shards) -> int:
        """Elements of this rank's parameters as FSDP2 gathers them (dim 0 padded)."""
        return sum(n * padded_numel(params, shards) for params, n in self.groups)

    def num_tensors(self) -> int:
        return sum(n * len(params) for params, n in self.groups)


def padded_numel(params: list[Param], shards: Shards) -> int:
    """Elements of ``params`` unsharded as FSDP2 gathers them (dim 0 padded)."""
    return sum(p.shard_numel(shards.of(p)) * shards.of(p) for p in params)


def rank_shares(cfg: Config, dims: ParallelDims) -> list[RankShare]:
    """Every pipeline rank's share (one entry without pipelining)."""
    m, p = cfg.model, cfg.parallel
    per_rank = p.stages_per_rank() if dims.pp > 1 else 1
    num_stages = dims.pp * per_rank
    layers = p.pp_layers or balanced_split(m.num_layers, num_stages)
    tied = m.tie_embeddings and dims.pp == 1
    ep = expert_parallel(cfg)
    # one list per kind of block (dense, MoE), shared by the blocks of that kind
    moe_layers = [m.is_moe_layer(i) for i in range(m.num_layers)]
    kinds = {moe: block_params(m, dims.tp, moe, ep) for moe in set(moe_layers)}
    shares = []
    for rank in range(dims.pp):
        stages = stage_ids(rank, dims.pp, per_rank, p.pp_schedule) if dims.pp > 1 else [0]
        root: list[Param] = []
        if 0 in stages:
            root += embedding_params(m, dims.tp)
        if num_stages - 1 in stages:
            root += head_params(m, dims.tp, tied)
        firsts = [sum(layers[:s]) for s in stages]
        ids = [i for s, first in zip(stages, firsts) for i in range(first, first + layers[s])]
        block = [kinds[moe_layers[i]] for i in ids]
        moe = sum(moe_layers[i] for i in ids)
        shares.append(RankShare(
            rank, stages, [layers[s] for s in stages], num_stages, block, root, firsts, moe
        ))  # fmt: skip
    return shares


def fsdp_shards(dims: ParallelDims, engine: str, ep: int = 1) -> Shards:
    """Ranks each parameter is sharded over: FSDP2 shards over dp_shard x cp (HSDP replicates
    those shards dp_replicate times), a routed expert's weights over (dp_shard / ep) x cp, the
    ep ranks holding different experts; 1 without FSDP."""
    if engine != "fsdp" or dims.dp * dims.cp == 1:
        return Shards(1, 1)
    return Shards(dims.dp_shard * dims.cp, dims.dp_shard // ep * dims.cp)
