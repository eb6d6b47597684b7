"""The parameter tensors each pipeline rank holds, after tensor parallelism, and how FSDP2
shards them: the counting the memory and speed models share.

Tensor parallelism follows eurotrain/models/plans.py: column-parallel q/k/v, w1/w3 and the
output projection split dim 0, row-parallel wo/w2 split dim 1, the vocabulary-parallel embedding
splits dim 0, norms are replicated. Pipeline stages follow eurotrain/parallel/pipeline.py: the
blocks of each stage (``pp_layers`` or balanced), the embedding on stage 0 and the final norm and
output on the last stage, the stages of a rank in "loop" order or, for ZBV, "V" order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    def shard_numel(self, num_shards: int) -> int:
        """Elements of one FSDP2 shard: dim 0 padded to a multiple of the shard count."""
        return math.ceil(self.rows / num_shards) * self.cols


def block_params(m: ModelConfig, tp: int) -> list[Param]:
    assert m.head_dim is not None and m.num_kv_heads is not None
    q, kv = m.num_heads * m.head_dim // tp, m.num_kv_heads * m.head_dim // tp
    params = [
        Param("attention_norm", m.dim),
        Param("wq", q, m.dim),
        Param("wk", kv, m.dim),
        Param("wv", kv, m.dim),
        Param("wo", m.dim, q),
        Param("ffn_norm", m.dim),
        Param("w1", m.ffn_dim // tp, m.dim),
        Param("w3", m.ffn_dim // tp, m.dim),
        Param("w2", m.dim, m.ffn_dim // tp),
    ]
    if m.qkv_bias:
        params += [Param("bq", q), Param("bk", kv), Param("bv", kv)]
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
    block: list[Param]
    """One block's parameters (every block has the same)."""
    root: list[Param]
    """Embedding, final norm and output this rank holds: FSDP's root group of its stage(s)."""

    @property
    def num_blocks(self) -> int:
        return sum(self.blocks)

    @property
    def has_embedding(self) -> bool:
        return 0 in self.stages

    @property
    def has_head(self) -> bool:
        return self.num_stages - 1 in self.stages

    def numel(self) -> int:
        return self.num_blocks * sum(p.numel for p in self.block) + sum(p.numel for p in self.root)

    def shard_numel(self, num_shards: int) -> int:
        """Elements of this rank's FSDP shards (its whole share when ``num_shards`` is 1)."""
        blocks = self.num_blocks * sum(p.shard_numel(num_shards) for p in self.block)
        return blocks + sum(p.shard_numel(num_shards) for p in self.root)

    def num_tensors(self) -> int:
        return self.num_blocks * len(self.block) + len(self.root)


def rank_shares(cfg: Config, dims: ParallelDims) -> list[RankShare]:
    """Every pipeline rank's share (one entry without pipelining)."""
    m, p = cfg.model, cfg.parallel
    per_rank = p.stages_per_rank() if dims.pp > 1 else 1
    num_stages = dims.pp * per_rank
    layers = p.pp_layers or balanced_split(m.num_layers, num_stages)
    tied = m.tie_embeddings and dims.pp == 1
    block = block_params(m, dims.tp)
    shares = []
    for rank in range(dims.pp):
        stages = stage_ids(rank, dims.pp, per_rank, p.pp_schedule) if dims.pp > 1 else [0]
        root: list[Param] = []
        if 0 in stages:
            root += embedding_params(m, dims.tp)
        if num_stages - 1 in stages:
            root += head_params(m, dims.tp, tied)
        shares.append(RankShare(rank, stages, [layers[s] for s in stages], num_stages, block, root))
    return shares


def fsdp_shards(dims: ParallelDims, engine: str) -> int:
    """Ranks each parameter is sharded over: FSDP2 shards over dp_shard x cp (HSDP replicates
    those shards dp_replicate times); 1 without FSDP."""
    if engine != "fsdp" or dims.dp * dims.cp == 1:
        return 1
    return dims.dp_shard * dims.cp
