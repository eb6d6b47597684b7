"""Sequence sources: a token stream cut into fixed-length rows that the loader reads by index.

Every source serves row i as tokens ``[i * seq_len, i * seq_len + seq_len + 1)`` of its stream
(inputs and labels shifted by one), so documents are packed across rows. In-memory tokens
(PackedSequences) and prepared memory-mapped shards (PreparedSequences) behave the same; a
SubsetSequences view selects rows (the train / validation split).
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from eurotrain.data.shards import PreparedDataset

# The validation rows do not depend on train.seed: changing the seed must not leak
# validation text into training.
SPLIT_SEED = 0x5EED


class SequenceSource(Protocol):
    seq_len: int
    name: str

    def __len__(self) -> int: ...

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Rows ``indices`` as one [n, seq_len + 1] array."""
        ...

    def positions(self, indices: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Per-document position ids [n, seq_len] of the rows' inputs, and their cu_seqlens."""
        ...


def document_positions(
    doc_ends: np.ndarray, row_starts: np.ndarray, length: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Position ids restarting at 0 at every document start (and at each row start), and the
    cumulative segment lengths [0, ..., length] of each row, from the documents' end offsets."""
    ar = np.arange(length, dtype=np.int64)
    lo = np.searchsorted(doc_ends, row_starts, side="right")
    hi = np.searchsorted(doc_ends, row_starts + length, side="left")
    positions = np.empty((len(row_starts), length), dtype=np.int64)
    cu_seqlens = []
    for i, s in enumerate(row_starts.tolist()):
        cu = np.concatenate(([0], doc_ends[lo[i] : hi[i]] - s, [length])).astype(np.int32)
        positions[i] = ar - cu[np.searchsorted(cu, ar, side="right") - 1]
        cu_seqlens.append(cu)
    return positions, cu_seqlens


class PackedSequences:
    """An in-memory token stream (the raw-text path) served as packed rows."""

    def __init__(self, tokens: np.ndarray, seq_len: int, eos_id: int = -1, name: str = "") -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.name = name or "corpus"
        self.num_sequences = (len(tokens) - 1) // seq_len
        self._doc_ends = np.flatnonzero(tokens == eos_id) + 1

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, i: int) -> np.ndarray:
        start = i * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]

    def gather(self, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)[:, None] * self.seq_len
        return self.tokens[idx + np.arange(self.seq_len + 1)]

    def positions(self, indices: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        starts = np.asarray(indices, dtype=np.int64) * self.seq_len
        return document_positions(self._doc_ends, starts, self.seq_len)


class PreparedSequences:
    """Packed rows of a prepared directory, read from its memory-mapped shards."""

    def __init__(self, dataset: PreparedDataset, seq_len: int) -> None:
        self.dataset = dataset
        self.seq_len = seq_len
        self.name = str(dataset.path)
        self.num_sequences = max(0, (dataset.num_tokens - 1) // seq_len)

    def __len__(self) -> int:
        return self.num_sequences

    def gather(self, indices: np.ndarray) -> np.ndarray:
        starts = np.asarray(indices, dtype=np.int64) * self.seq_len
        return self.dataset.read_rows(starts, self.seq_len + 1)

    def positions(self, indices: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        starts = np.asarray(indices, dtype=np.int64) * self.seq_len
        return document_positions(self.dataset.doc_ends, starts, self.seq_len)


class SubsetSequences:
    """The rows ``rows`` of another source, renumbered 0..len(rows)-1."""

    def __init__(self, source: SequenceSource, rows: np.ndarray, name: str) -> None:
        self.source = source
        self.rows = rows
        self.seq_len = source.seq_len
        self.name = name

    def __len__(self) -> int:
        return len(self.rows)

    def gather(self, indices: np.ndarray) -> np.ndarray:
        return self.source.gather(self.rows[indices])

    def positions(self, indices: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        return self.source.positions(self.rows[indices])


def split_validation(
    source: SequenceSource, fraction: float
) -> tuple[SubsetSequences, SubsetSequences]:
    """Hold out ``ceil(fraction * len)`` rows, chosen by a fixed seed, for validation."""
    n = len(source)
    num_val = min(n - 1, math.ceil(fraction * n))
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    val, train = np.sort(perm[:num_val]), np.sort(perm[num_val:])
    return (
        SubsetSequences(source, train, source.name),
        SubsetSequences(source, val, f"{source.name} (validation)"),
    )
