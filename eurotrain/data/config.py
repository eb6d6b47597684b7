"""Data configuration."""

from __future__ import annotations

from dataclasses import dataclass

from eurotrain.configtools import ConfigError


@dataclass
class DataConfig:
    """Where the training text comes from and how it is cut into sequences."""

    corpus: str = "demo"
    """"demo" (Python's own standard-library sources, present on every machine), or the local
    path of a text file, a directory of .txt/.md/.py files, or a glob."""
    tokenizer: str = "byte"
    """"byte" (UTF-8 bytes, vocabulary 257) or the local path of a HF tokenizer."""
    seq_len: int = 128
    """Tokens per training sequence; documents are packed across sequence boundaries."""
    demo_bytes: int = 2_000_000
    """Size of the demo corpus in bytes (the first files of the standard library, sorted)."""

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len: {self.seq_len} must be at least 2")
        if self.demo_bytes < 1000:
            raise ConfigError(f"data.demo_bytes: {self.demo_bytes} is too small (>= 1000)")
