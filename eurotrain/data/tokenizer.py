"""Tokenizers: a byte-level default, or a HF tokenizer loaded from local files only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from eurotrain.configtools import ConfigError
from eurotrain.errors import unreadable

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, and 256 as end-of-document. Needs no files at all."""

    vocab_size = 257
    eos_id = 256
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A transformers/tokenizers tokenizer from a local directory or tokenizer.json file."""

    def __init__(self, path: str) -> None:
        p = Path(path)
        self.tok: PreTrainedTokenizerBase
        if p.is_file():
            from tokenizers import Tokenizer as RawTokenizer
            from transformers import PreTrainedTokenizerFast

            self.tok = PreTrainedTokenizerFast(tokenizer_object=RawTokenizer.from_file(str(p)))
        else:
            from transformers import AutoTokenizer

            refuse_custom_code(p)
            self.tok = AutoTokenizer.from_pretrained(
                str(p), local_files_only=True, trust_remote_code=False
            )
        self.name = str(p.resolve())
        # Ids need not be contiguous (a vocabulary with gaps, added tokens placed far out): the
        # model's embedding and the shards' dtype must hold the largest id, not just the count.
        self.vocab_size = max(len(self.tok), max(self.tok.get_vocab().values(), default=-1) + 1)
        eos = self.tok.eos_token_id
        if eos is None:  # a bare tokenizer.json: find a conventional end-of-text token
            for cand in ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "[SEP]"):
                tid = self.tok.convert_tokens_to_ids(cand)
                if isinstance(tid, int) and tid != self.tok.unk_token_id and tid >= 0:
                    eos = tid
                    break
        if eos is None:
            raise ConfigError(
                f"tokenizer {path!r} defines no end-of-text token: add eos_token to its "
                f"tokenizer_config.json (or a token such as <|endoftext|> to its vocabulary)"
            )
        self.eos_id = int(eos)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        text = self.tok.decode(ids)
        assert isinstance(text, str)  # one sequence of ids decodes to one string
        return text


CODE_FILES = ("tokenizer_config.json", "config.json")
"""The files where transformers looks for ``auto_map`` (custom Python classes to import)."""


def refuse_custom_code(folder: Path) -> None:
    """A tokenizer directory that names its own Python code is refused before transformers sees
    it: transformers would ask on a terminal whether to run that code (one "y" from running a
    stranger's program on a login node), or fail after printing the question."""
    for name in CODE_FILES:
        f = folder / name
        if not f.exists():
            continue
        try:
            if not f.is_file() or f.stat().st_size > 1 << 26:
                raise ValueError("not a regular file of at most 64 MiB")
            config = json.loads(f.read_bytes())
        except (OSError, ValueError, RecursionError) as e:
            raise ConfigError(
                f"data.tokenizer: {f} is unreadable ({unreadable(e)}): repair or remove it"
            ) from None
        if isinstance(config, dict) and "auto_map" in config:
            raise ConfigError(
                f"data.tokenizer: {f} names custom Python code (auto_map), which eurotrain never "
                f"runs: use a tokenizer.json-based tokenizer (remove auto_map and the .py files, "
                f"or save the tokenizer's tokenizer.json alone and give its path)"
            )


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"``, or the local path of a HF tokenizer directory or tokenizer.json file."""
    if spec == "byte":
        return ByteTokenizer()
    p = Path(spec)
    if not p.exists():
        raise ConfigError(
            f"data.tokenizer: {spec!r} does not exist. Give the local path of a HF tokenizer "
            f"directory (with tokenizer.json) or of a tokenizer.json file, or 'byte' for the "
            f"byte-level tokenizer. Compute nodes have no internet: hub names do not work."
        )
    if p.is_dir() and not any(
        (p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        raise ConfigError(
            f"data.tokenizer: directory {spec!r} holds no tokenizer.json or "
            f"tokenizer_config.json; save one with tokenizer.save_pretrained({spec!r})"
        )
    try:
        return HFTokenizer(spec)
    except ConfigError:
        raise
    except Exception as e:  # transformers raises many types for broken files
        raise ConfigError(f"data.tokenizer: could not load {spec!r}: {e}") from None


# Files that define a HF tokenizer; weights and other model files in the same directory are not
# part of its identity.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
)


def tokenizer_identity(spec: str, tokenizer: Tokenizer) -> dict[str, object]:
    """Name, content hash, vocabulary size and end-of-document id of a tokenizer.

    The hash covers the tokenizer's own files (not their location), so a copy of the same
    tokenizer elsewhere on the file system is the same tokenizer, and any edit to the vocabulary,
    merges or special tokens is a different one."""
    import hashlib

    h = hashlib.sha256()
    if spec == "byte":
        h.update(b"eurotrain-byte-tokenizer-v1")
    else:
        p = Path(spec)
        files = [p] if p.is_file() else [p / f for f in TOKENIZER_FILES if (p / f).is_file()]
        for f in files:
            h.update(f.name.encode() + b"\0")
            h.update(f.read_bytes())
            h.update(b"\0")
    h.update(f"vocab={tokenizer.vocab_size};eos={tokenizer.eos_id}".encode())
    return {
        "name": tokenizer.name,
        "sha256": h.hexdigest(),
        "vocab_size": int(tokenizer.vocab_size),
        "eos_id": int(tokenizer.eos_id),
    }
