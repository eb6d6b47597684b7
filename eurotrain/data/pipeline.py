"""The trainer's one entry point to data: open and check everything, then build loaders.

``DataPipeline(cfg)`` opens the training and validation data (prepared shards when
``data.sources`` is given, else the raw-text corpus tokenized in memory) and checks it before
any model exists; ``train_loader`` / ``validation_loader`` then build the loaders once the
data-parallel rank is known.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, cast

import torch.distributed as dist

from eurotrain.configtools import ConfigError
from eurotrain.data.config import DataConfig, SourceConfig
from eurotrain.data.loader import GlobalBatchLoader, tokenize_corpus
from eurotrain.data.shards import DataFormatError, PreparedDataset
from eurotrain.data.sources import (
    SPLIT_SEED,
    PackedSequences,
    PreparedSequences,
    SequenceSource,
    split_validation,
)
from eurotrain.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_identity

if TYPE_CHECKING:
    from eurotrain.config import Config


VERIFY_TIMEOUT_S = 4 * 3600.0
"""How long ranks that finished their share of the checksum pass wait for the slowest."""


class DataPipeline:
    """``rank`` / ``world``: with ``data.verify: checksum`` each rank reads its share of the
    prepared shards (every world-th one) and the ranks agree on the verdict (a gloo group
    when torch.distributed is up), so a corpus is read once per start, not once per rank."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world: int = 1) -> None:
        self.cfg = cfg
        self._opened: list[tuple[str, PreparedDataset]] = []
        self.tokenizer: Tokenizer | None = None
        self.train_sources: list[SequenceSource]
        self.validation_sources: list[SequenceSource] = []
        if cfg.sources:
            self.train_sources, self.identity = self._open(cfg.sources, "data.sources")
            self.weights = [s.weight for s in cfg.sources]
            if cfg.tokenizer != "byte":  # an explicit tokenizer must be the data's own
                tok = load_tokenizer(cfg.tokenizer)
                ident = tokenizer_identity(cfg.tokenizer, tok)
                if ident["sha256"] != self.identity["sha256"]:
                    raise ConfigError(
                        f"data.tokenizer {cfg.tokenizer!r} is not the tokenizer the sources "
                        f"were prepared with ({self.identity['name']}): leave data.tokenizer "
                        f"unset with data.sources, or prepare the data with this tokenizer"
                    )
        else:
            self.tokenizer = load_tokenizer(cfg.tokenizer)
            self.identity = tokenizer_identity(cfg.tokenizer, self.tokenizer)
            tokens = tokenize_corpus(cfg, self.tokenizer)
            self.train_sources = [
                PackedSequences(tokens, cfg.seq_len, self.tokenizer.eos_id, cfg.corpus)
            ]
            self.weights = [1.0]
        if cfg.validation_sources:
            self.validation_sources, ident = self._open(
                cfg.validation_sources, "data.validation_sources"
            )
            self._check_same(ident, "data.validation_sources", self.identity)
            self.validation_weights = [s.weight for s in cfg.validation_sources]
        elif cfg.validation_fraction:
            pairs = [split_validation(s, cfg.validation_fraction) for s in self.train_sources]
            self.train_sources = [t for t, _ in pairs]
            self.validation_sources = [v for _, v in pairs]
            self.validation_weights = self.weights
            for v in self.validation_sources:
                if len(v) == 0:
                    raise ConfigError(
                        f"data.validation_fraction={cfg.validation_fraction} holds out no "
                        f"sequence of {v.name!r}: raise it or give data.validation_sources"
                    )
        self.vocab_size = int(cast(int, self.identity["vocab_size"]))
        if cfg.verify == "checksum" and self._opened:
            self._verify_everywhere(rank, world)

    def _verify_everywhere(self, rank: int, world: int) -> None:
        """This rank's share of the checksum and token-id pass; every rank raises the first
        problem any rank found, or none does."""
        agree = world > 1 and dist.is_available() and dist.is_initialized()
        if not agree:  # no group to agree in: this process checks everything
            rank, world = 0, 1
        problem, offset = "", 0
        for key, ds in self._opened:
            try:
                ds.verify_share(rank, world, offset)
            except DataFormatError as e:
                problem = f"{key}: {e}"
                break
            offset += ds.num_shards
        if agree:
            group = dist.new_group(backend="gloo", timeout=timedelta(seconds=VERIFY_TIMEOUT_S))
            problems: list[str | None] = [None] * world
            dist.all_gather_object(problems, problem, group=group)
            dist.destroy_process_group(group)
            problem = next((p for p in problems if p), "")
        if problem:
            raise ConfigError(problem)

    def check_model_vocab(self, model_vocab_size: int) -> None:
        """The model's embedding must hold every id of the data's tokenizer."""
        if self.vocab_size > model_vocab_size:
            raise ConfigError(
                f"the tokenizer {self.identity['name']!r} has {self.vocab_size} tokens but "
                f"model.vocab_size is {model_vocab_size}: set model.vocab_size to at least "
                f"{self.vocab_size} (a multiple of 64 is fastest)"
            )

    def _open(
        self, sources: list[SourceConfig], key: str
    ) -> tuple[list[SequenceSource], dict[str, object]]:
        opened: list[SequenceSource] = []
        identity: dict[str, object] | None = None
        for s in sources:
            try:  # sizes here, the same on every rank; checksums split over ranks, after
                ds = PreparedDataset(s.path, verify="size")
            except DataFormatError as e:
                raise ConfigError(f"{key}: {e}") from None
            self._opened.append((key, ds))
            if identity is None:
                identity = ds.tokenizer
            self._check_same(ds.tokenizer, f"{key} {s.path!r}", identity)
            if self.cfg.document_positions:  # read (and check) the index now, before any model
                try:
                    _ = ds.doc_ends
                except DataFormatError as e:
                    raise ConfigError(f"{key}: {e}") from None
            opened.append(PreparedSequences(ds, self.cfg.seq_len))
        assert identity is not None
        return opened, identity

    @staticmethod
    def _check_same(ident: dict[str, object], where: str, expected: dict[str, object]) -> None:
        if ident["sha256"] != expected["sha256"]:
            raise ConfigError(
                f"{where} was prepared with tokenizer {ident['name']} "
                f"(sha256 {str(ident['sha256'])[:12]}), the other data with {expected['name']} "
                f"(sha256 {str(expected['sha256'])[:12]}): all data of a run must share one "
                f"tokenizer; prepare it again with the same tokenizer"
            )

    def train_loader(
        self, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int, seed: int
    ) -> GlobalBatchLoader:
        return GlobalBatchLoader(
            self.train_sources,
            global_batch,
            micro_batch,
            dp_rank,
            dp_size,
            seed,
            weights=self.weights,
            document_positions=self.cfg.document_positions,
            vocab_size=self.vocab_size,
        )

    def validation_loader(
        self, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int
    ) -> GlobalBatchLoader | None:
        """The validation batches, in a fixed order (evaluate from step 0 each time)."""
        if not self.validation_sources:
            return None
        total = sum(len(s) for s in self.validation_sources)
        if total < global_batch:
            raise ConfigError(
                f"the validation data gives {total} sequences, fewer than one global batch "
                f"({global_batch}): raise data.validation_fraction or add validation data"
            )
        return GlobalBatchLoader(
            self.validation_sources,
            global_batch,
            micro_batch,
            dp_rank,
            dp_size,
            SPLIT_SEED,
            weights=self.validation_weights,
            document_positions=self.cfg.document_positions,
            vocab_size=self.vocab_size,
        )


def prepared_data_problem(cfg: Config) -> str:
    """What the trainer's start-up would find wrong with prepared data (``data.sources``):
    manifests, shard names, types and sizes, one tokenizer, the model's vocabulary; "" when
    fine. Sizes only (no checksum pass, no document index), so a login node answers in
    seconds (`eurotrain launch`, `eurotrain doctor`). A raw-text corpus is not tokenized here."""
    if not cfg.data.sources:
        return ""
    try:
        data = DataPipeline(replace(cfg.data, verify="size", document_positions=False))
        data.check_model_vocab(cfg.model.vocab_size)
    except ConfigError as e:
        return str(e)
    return ""
