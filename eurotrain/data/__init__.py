"""Data: tokenizers, the corpus, packed sequences and the resumable global-batch loader.

``build_loader`` is the one entry point the trainer uses; the full pipeline (prepared
memory-mapped shards, blending) plugs in behind it.
"""

from __future__ import annotations

from eurotrain.data.config import DataConfig
from eurotrain.data.loader import Batch, GlobalBatchLoader, PackedSequences, tokenize_corpus
from eurotrain.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer


def build_sequences(cfg: DataConfig, tokenizer: Tokenizer) -> PackedSequences:
    return PackedSequences(tokenize_corpus(cfg, tokenizer), cfg.seq_len)


__all__ = [
    "Batch",
    "ByteTokenizer",
    "DataConfig",
    "GlobalBatchLoader",
    "PackedSequences",
    "Tokenizer",
    "build_sequences",
    "load_tokenizer",
]
