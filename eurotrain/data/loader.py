"""A deterministic, resumable global-batch loader over one or several blended sources.

Global batch k is slots [k * B, (k + 1) * B) of the blend schedule (eurotrain/data/blend.py),
whatever the number of data-parallel ranks, and each rank takes its contiguous slice. That is
what makes N ranks train exactly like one, and what lets a checkpoint store the loader's
position as a single number that stays valid under a different number of ranks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from eurotrain.configtools import ConfigError
from eurotrain.data.blend import BlendSchedule, ShuffledRows
from eurotrain.data.config import DataConfig
from eurotrain.data.corpus import documents
from eurotrain.data.shards import out_of_vocabulary
from eurotrain.data.sources import PackedSequences, SequenceSource
from eurotrain.data.tokenizer import ByteTokenizer, Tokenizer
from eurotrain.errors import CheckpointError, shown


def tokenize_corpus(cfg: DataConfig, tokenizer: Tokenizer) -> np.ndarray:
    """All documents of the corpus, tokenized and joined with end-of-document tokens."""
    parts: list[np.ndarray] = []
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    for doc in documents(cfg.corpus, cfg.demo_bytes):
        if isinstance(tokenizer, ByteTokenizer):
            ids = np.frombuffer(doc.encode("utf-8"), dtype=np.uint8).astype(dtype)
        else:
            ids = np.asarray(tokenizer.encode(doc), dtype=dtype)
        parts.append(ids)
        parts.append(np.asarray([tokenizer.eos_id], dtype=dtype))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    if len(tokens) <= len(parts):  # nothing but end-of-document markers
        raise ConfigError(f"data.corpus: {cfg.corpus!r} holds no text (all files are empty)")
    return tokens


@dataclass
class Batch:
    """One rank's share of one global batch, as micro-batches of [micro_batch, seq_len].

    With document positions on, ``positions`` holds per-document position ids (same shape as
    the inputs) and ``cu_seqlens`` each row's cumulative document lengths [0, ..., seq_len]."""

    inputs: list[torch.Tensor]
    labels: list[torch.Tensor]
    num_tokens: int = 0
    """Labels the loss counts (ignored labels are negative), known on the host when the batch
    is made, so counting them never waits for a device."""
    positions: list[torch.Tensor] | None = None
    cu_seqlens: list[list[torch.Tensor]] | None = None
    source_ids: np.ndarray | None = None
    """The source of each of this rank's rows (index into the loader's sources)."""


class GlobalBatchLoader:
    """Serves this rank's micro-batches of each global batch; its state is one integer."""

    def __init__(
        self,
        data: SequenceSource | Sequence[SequenceSource],
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        weights: Sequence[float] | None = None,
        shuffle: bool = True,
        document_positions: bool = False,
        vocab_size: int | None = None,
    ) -> None:
        sources: list[SequenceSource] = (
            list(data) if isinstance(data, (list, tuple)) else [cast(SequenceSource, data)]
        )
        weights = list(weights) if weights is not None else [1.0] * len(sources)
        if len(weights) != len(sources):
            raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
        if global_batch % (micro_batch * dp_size):
            raise ConfigError(
                f"train.global_batch_size ({global_batch}) must be a multiple of "
                f"train.micro_batch_size ({micro_batch}) x data-parallel ranks ({dp_size})"
            )
        for s in sources:
            if len(s) == 0:
                raise ConfigError(
                    f"data source {s.name!r} holds fewer than data.seq_len + 1 = "
                    f"{s.seq_len + 1} tokens: it gives no sequence; add text or drop it"
                )
        total = sum(len(s) for s in sources)
        if total < global_batch:
            raise ConfigError(
                f"the data gives only {total} sequences of data.seq_len={sources[0].seq_len} "
                f"tokens, fewer than one global batch ({global_batch}); use more text or a "
                f"smaller train.global_batch_size / data.seq_len"
            )
        self.sources = sources
        self.weights = weights
        self.seq_len = sources[0].seq_len
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.document_positions = document_positions
        self.vocab_size = vocab_size
        """When given, every batch's token ids are checked against it on the host (a forged or
        mismatched shard stops with its name, never reaches an embedding on a device)."""
        self.schedule = BlendSchedule(weights, [s.name for s in sources])
        self.rows = [ShuffledRows(len(s), seed, i, shuffle) for i, s in enumerate(sources)]
        self.batches_per_epoch = max(1, total // global_batch)
        self.step = 0  # global batches served so far
        key = ";".join(f"{len(s)}:{w!r}" for s, w in zip(sources, weights))
        self.fingerprint = hashlib.sha256(f"{self.seq_len};{key}".encode()).hexdigest()[:16]

    def locate(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source id, row within that source) of each global slot."""
        src, j = self.schedule.assign(slots)
        rows = np.empty_like(j)
        for s in np.unique(src).tolist():
            mask = src == s
            rows[mask] = self.rows[s].rows(j[mask])
        return src, rows

    def global_indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source ids, rows) of global batch number ``step`` (0-based), all ranks together."""
        return self.locate(step * self.global_batch + np.arange(self.global_batch))

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        per_rank = self.global_batch // self.dp_size
        first = self.step * self.global_batch + self.dp_rank * per_rank
        src, rows = self.locate(first + np.arange(per_rank))
        self.step += 1
        tokens = np.empty((per_rank, self.seq_len + 1), dtype=np.int64)
        positions = np.empty((per_rank, self.seq_len), dtype=np.int64)
        cu: list = [None] * per_rank
        for s in np.unique(src).tolist():
            mask = src == s
            tokens[mask] = self.sources[s].gather(rows[mask])
            if self.document_positions:
                pos, cus = self.sources[s].positions(rows[mask])
                positions[mask] = pos
                for i, c in zip(np.flatnonzero(mask).tolist(), cus):
                    cu[i] = torch.from_numpy(c)
        if self.vocab_size is not None and tokens.size and tokens.max() >= self.vocab_size:
            i, j = (int(x) for x in np.argwhere(tokens >= self.vocab_size)[0])
            raise out_of_vocabulary(
                f"data source {self.sources[src[i]].name!r}",
                f"position {j} of its sequence {int(rows[i]):,}",
                int(tokens[i, j]),
                self.vocab_size,
            )
        t = torch.from_numpy(tokens)
        batch = Batch(
            inputs=list(t[:, :-1].split(self.micro_batch)),
            labels=list(t[:, 1:].split(self.micro_batch)),
            num_tokens=int(np.count_nonzero(tokens[:, 1:] >= 0)),
            source_ids=src,
        )
        if self.document_positions:
            batch.positions = list(torch.from_numpy(positions).split(self.micro_batch))
            m = self.micro_batch
            batch.cu_seqlens = [cu[i : i + m] for i in range(0, per_rank, m)]
        return batch

    def state_dict(self) -> dict[str, int | str]:
        return {
            "step": self.step,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, int | str]) -> None:
        if state.get("global_batch", self.global_batch) != self.global_batch:
            raise ConfigError(
                f"the checkpoint's data position was saved with global batch "
                f"{state['global_batch']}, this run uses {self.global_batch}: keep "
                f"train.global_batch_size unchanged to resume the same data order"
            )
        if state.get("fingerprint", self.fingerprint) != self.fingerprint:
            raise ConfigError(
                "the checkpoint's data position belongs to other data (the sources' sizes, "
                "weights or data.seq_len differ): resume with the same data settings, or start "
                "the data order afresh by not loading the loader state"
            )
        if state.get("seed", self.seed) != self.seed:
            raise ConfigError(
                f"the checkpoint's data order was seeded with {state['seed']}, this run uses "
                f"train.seed={self.seed}: keep the seed to resume the same data order"
            )
        step = state.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CheckpointError(
                f"the checkpoint's data position (step) is {shown(step)}, not a count of batches "
                f"served: the checkpoint is damaged; resume from another one"
            )
        self.step = step


__all__ = ["Batch", "GlobalBatchLoader", "PackedSequences", "tokenize_corpus"]
