"""The on-disk format of prepared data: token shards, document indexes and the manifest.

A prepared directory holds

- ``shard-NNNNN.bin``: the tokens of consecutive documents, each followed by the end-of-document
  token, as raw little-endian uint16 (vocabulary <= 65536) or uint32;
- ``shard-NNNNN.idx``: the document index of that shard, raw little-endian int64: the end offset
  (exclusive, in tokens, end-of-document token included) of every document in the shard;
- ``manifest.json``: the tokenizer's identity, the dtype, and per shard its token and document
  counts and the SHA-256 of both files, plus which input each shard came from.

The token stream of the dataset is the shards' tokens in manifest order; shard boundaries are
invisible to the reader (a sequence may span two shards).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from eurotrain.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "eurotrain-tokens"
VERSION = 1


class DataFormatError(DataError):
    """A prepared directory is missing, incomplete, corrupted or inconsistent."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of the vocabulary."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes | memoryview) -> str:
    """Write, fsync and rename, so a file under its final name is always complete."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: no half-written file stays behind
        tmp.unlink(missing_ok=True)
        raise
    return hashlib.sha256(data).hexdigest()


def write_shard(
    out_dir: Path, number: int, tokens: np.ndarray, doc_ends: np.ndarray
) -> dict[str, Any]:
    """Write one shard and its document index; returns its manifest entry."""
    name = f"shard-{number:05d}"
    tokens = np.ascontiguousarray(tokens)
    index = np.ascontiguousarray(doc_ends, dtype="<i8")
    return {
        "file": f"{name}.bin",
        "index_file": f"{name}.idx",
        "num_tokens": len(tokens),
        "num_documents": len(index),
        "sha256": _write_atomic(out_dir / f"{name}.bin", tokens.data.cast("B")),
        "index_sha256": _write_atomic(out_dir / f"{name}.idx", index.data.cast("B")),
    }


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of a prepared directory, or None when there is none yet."""
    f = path / MANIFEST
    if not f.exists():
        return None
    try:
        manifest = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{f} is not valid JSON ({e}): the manifest is damaged") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataFormatError(
            f"{f} is not a eurotrain prepared-data manifest (format {FORMAT!r} version {VERSION})"
        )
    return manifest


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    manifest["num_tokens"] = sum(s["num_tokens"] for s in manifest["shards"])
    manifest["num_documents"] = sum(s["num_documents"] for s in manifest["shards"])
    _write_atomic(path / MANIFEST, json.dumps(manifest, indent=1).encode())


class PreparedDataset:
    """The token stream of a prepared directory, memory-mapped, with vectorised row reads."""

    def __init__(self, path: str | Path, verify: str = "checksum") -> None:
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise DataFormatError(
                f"{self.path} holds no {MANIFEST}: prepare it first with "
                f"'eurotrain data prepare --input ... --tokenizer ... --output {self.path}'"
            )
        unfinished = [i["spec"] for i in manifest["inputs"] if not i["complete"]]
        if unfinished:
            raise DataFormatError(
                f"{self.path}: preparing {unfinished} was interrupted; rerun the same "
                f"'eurotrain data prepare' command to finish (completed shards are kept)"
            )
        self.manifest = manifest
        self.tokenizer: dict[str, Any] = manifest["tokenizer"]
        self.dtype = np.dtype(manifest["dtype"])
        shards = [s for s in manifest["shards"] if s["num_tokens"] > 0]
        for s in shards:
            self._check_shard(s, verify)
        # Plain ndarray views of the maps: slicing them skips np.memmap's per-slice overhead.
        self._maps = [
            np.memmap(self.path / s["file"], dtype=self.dtype, mode="r").view(np.ndarray)
            for s in shards
        ]
        self._index_files = [self.path / s["index_file"] for s in shards]
        self.starts = np.cumsum([0] + [s["num_tokens"] for s in shards], dtype=np.int64)
        self.num_tokens = int(self.starts[-1])
        self.num_documents = sum(s["num_documents"] for s in shards)
        self._doc_ends: np.ndarray | None = None

    def _check_shard(self, s: dict[str, Any], verify: str) -> None:
        for key, sum_key, expected in (
            ("file", "sha256", s["num_tokens"] * self.dtype.itemsize),
            ("index_file", "index_sha256", s["num_documents"] * 8),
        ):
            f = self.path / s[key]
            if not f.exists():
                raise DataFormatError(
                    f"{f} is missing (listed in {self.path / MANIFEST}); restore it or prepare "
                    f"the data again"
                )
            size = f.stat().st_size
            if size != expected:
                raise DataFormatError(
                    f"{f} has {size} bytes but the manifest expects {expected}: the shard is "
                    f"truncated or damaged; restore it or prepare the data again"
                )
            if verify == "checksum" and sha256_file(f) != s[sum_key]:
                raise DataFormatError(
                    f"{f} fails its SHA-256 check against {self.path / MANIFEST}: the shard is "
                    f"corrupted; restore it or prepare the data again"
                )

    @property
    def doc_ends(self) -> np.ndarray:
        """End offsets (exclusive) of every document in the whole token stream."""
        if self._doc_ends is None:
            parts = [
                np.fromfile(f, dtype="<i8") + start
                for f, start in zip(self._index_files, self.starts[:-1])
            ]
            self._doc_ends = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return self._doc_ends

    def read_rows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows ``tokens[s : s + length]`` for every s in ``starts``, as one [n, length] array."""
        out = np.empty((len(starts), length), dtype=self.dtype)
        first = np.searchsorted(self.starts, starts, side="right") - 1
        last = np.searchsorted(self.starts, starts + length - 1, side="right") - 1
        local = starts - self.starts[first]
        # A contiguous slice copy per row: memcpy speed, no index arrays to build.
        for i, (f, lo) in enumerate(zip(first.tolist(), local.tolist())):
            if f == last[i]:
                out[i] = self._maps[f][lo : lo + length]
            else:  # the rare row that spans shards
                out[i] = self._read_span(int(starts[i]), length)
        return out

    def _read_span(self, start: int, length: int) -> np.ndarray:
        pieces, pos, end = [], start, start + length
        while pos < end:
            f = int(np.searchsorted(self.starts, pos, side="right")) - 1
            stop = min(end, int(self.starts[f + 1]))
            pieces.append(self._maps[f][pos - self.starts[f] : stop - self.starts[f]])
            pos = stop
        return np.concatenate(pieces)
