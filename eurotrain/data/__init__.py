"""Data: tokenizers, prepared memory-mapped shards, blending and the resumable loader.

``DataPipeline`` is the one entry point the trainer uses: it opens prepared sources
(``data.sources``) or tokenizes the raw-text corpus, checks them, and builds the global-batch
loaders. ``eurotrain data prepare`` (eurotrain/data/prepare.py) writes prepared sources.
"""

from __future__ import annotations

from eurotrain.data.config import DataConfig, SourceConfig
from eurotrain.data.loader import Batch, GlobalBatchLoader
from eurotrain.data.pipeline import DataPipeline
from eurotrain.data.shards import DataFormatError, PreparedDataset
from eurotrain.data.sources import PackedSequences, PreparedSequences
from eurotrain.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "Batch",
    "ByteTokenizer",
    "DataConfig",
    "DataFormatError",
    "DataPipeline",
    "GlobalBatchLoader",
    "PackedSequences",
    "PreparedDataset",
    "PreparedSequences",
    "SourceConfig",
    "Tokenizer",
    "load_tokenizer",
]
