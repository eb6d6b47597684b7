"""Data configuration: raw text (corpus + tokenizer) or prepared token shards (sources)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from eurotrain.configtools import ConfigError


@dataclass
class SourceConfig:
    """One prepared dataset (the output directory of ``eurotrain data prepare``) and its weight."""

    path: str = ""
    """Directory holding manifest.json and the token shards."""
    weight: float = 1.0
    """Share of training tokens drawn from this source, relative to the other sources' weights
    (they are normalised to sum to 1)."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError(
                "data.sources[].path is empty: give the directory written by "
                "'eurotrain data prepare --output DIR'"
            )
        if not self.weight > 0:
            raise ConfigError(f"data.sources[].weight: {self.weight} must be > 0 ({self.path})")


@dataclass
class DataConfig:
    """Where the training text comes from and how it is cut into sequences."""

    corpus: str = "demo"
    """"demo" (Python's own standard-library sources, present on every machine), or the local
    path of a text file, a directory of .txt/.md/.py files, or a glob. Ignored when
    ``sources`` is given."""
    tokenizer: str = "byte"
    """"byte" (UTF-8 bytes, vocabulary 257) or the local path of a HF tokenizer. With
    ``sources`` the tokenizer is the one recorded in their manifests."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Prepared datasets to train on, blended by weight: [{path: DIR, weight: 0.7}, ...]. When
    given, they replace corpus/tokenizer."""
    validation_sources: list[SourceConfig] = field(default_factory=list)
    """Prepared datasets used only for the validation loss (blended by weight)."""
    validation_fraction: float = 0.0
    """Fraction of each training source's sequences held out for the validation loss (a fixed,
    seed-independent selection); 0 holds none out. Exclusive with validation_sources."""
    seq_len: int = 128
    """Tokens per training sequence; documents are packed across sequence boundaries."""
    demo_bytes: int = 2_000_000
    """Size of the demo corpus in bytes (the first files of the standard library, sorted)."""
    document_positions: bool = False
    """Packed documents stay apart: every micro-batch also carries per-document position ids
    (and cu_seqlens), the model restarts RoPE positions at each document and attention is
    masked so that a token attends only to earlier tokens of its own document (training and
    validation)."""
    verify: Literal["size", "checksum"] = "checksum"
    """How prepared shards are checked when opened: sizes only, or sizes, SHA-256 and token ids
    (reads every shard once, split over the ranks; choose "size" for corpora of many
    terabytes)."""

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len: {self.seq_len} must be at least 2")
        if self.demo_bytes < 1000:
            raise ConfigError(f"data.demo_bytes: {self.demo_bytes} is too small (>= 1000)")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(
                f"data.validation_fraction: {self.validation_fraction} must be in [0, 1) "
                f"(e.g. 0.01 holds out 1% of the sequences)"
            )
        if self.validation_fraction and self.validation_sources:
            raise ConfigError(
                "data.validation_fraction and data.validation_sources are exclusive: hold out a "
                "fraction of the training data, or give separate validation data, not both"
            )
        paths = [s.path for s in self.sources]
        dup = {p for p in paths if paths.count(p) > 1}
        if dup:
            raise ConfigError(
                f"data.sources lists {sorted(dup)} more than once: give each prepared "
                f"directory once and set its weight instead"
            )
