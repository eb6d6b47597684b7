"""Packed fixed-length sequences and a deterministic, resumable global-batch loader.

The order of sequences depends only on (seed, epoch): global batch k is the same set of
sequences whatever the number of data-parallel ranks, and each rank takes its contiguous slice.
That is what makes N ranks train exactly like one, and what lets a checkpoint store the loader's
position as a single number.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from eurotrain.configtools import ConfigError
from eurotrain.data.config import DataConfig
from eurotrain.data.corpus import documents
from eurotrain.data.tokenizer import ByteTokenizer, Tokenizer


class PackedSequences:
    """A token stream cut into non-overlapping windows of seq_len + 1 (inputs and shifted labels)."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.num_sequences = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, i: int) -> np.ndarray:
        start = i * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]


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
    """One rank's share of one global batch, as micro-batches of [micro_batch, seq_len]."""

    inputs: list[torch.Tensor]
    labels: list[torch.Tensor]


class GlobalBatchLoader:
    """Serves this rank's micro-batches of each global batch; its state is one integer."""

    def __init__(
        self,
        data: PackedSequences,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
    ) -> None:
        if global_batch % (micro_batch * dp_size):
            raise ConfigError(
                f"train.global_batch_size ({global_batch}) must be a multiple of "
                f"train.micro_batch_size ({micro_batch}) x data-parallel ranks ({dp_size})"
            )
        if len(data) < global_batch:
            raise ConfigError(
                f"the corpus gives only {len(data)} sequences of data.seq_len={data.seq_len} "
                f"tokens, fewer than one global batch ({global_batch}); use more text or a "
                f"smaller train.global_batch_size / data.seq_len"
            )
        self.data = data
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.batches_per_epoch = len(data) // global_batch
        self.step = 0  # global batches served so far
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(len(self.data))
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def global_indices(self, step: int) -> np.ndarray:
        """Sequence indices of global batch number ``step`` (0-based)."""
        epoch, k = divmod(step, self.batches_per_epoch)
        perm = self._permutation(epoch)
        return perm[k * self.global_batch : (k + 1) * self.global_batch]

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        idx = self.global_indices(self.step)
        self.step += 1
        per_rank = self.global_batch // self.dp_size
        mine = idx[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        rows = torch.from_numpy(np.stack([self.data[int(i)] for i in mine]).astype(np.int64))
        inputs, labels = rows[:, :-1], rows[:, 1:]
        return Batch(
            inputs=list(inputs.split(self.micro_batch)), labels=list(labels.split(self.micro_batch))
        )

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("global_batch", self.global_batch) != self.global_batch:
            raise ConfigError(
                f"the checkpoint's data position was saved with global batch "
                f"{state['global_batch']}, this run uses {self.global_batch}: keep "
                f"train.global_batch_size unchanged to resume the same data order"
            )
        self.step = int(state["step"])
