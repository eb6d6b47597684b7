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
import stat
from pathlib import Path
from typing import Any

import numpy as np

from eurotrain.errors import DataError, shown, unreadable

MANIFEST = "manifest.json"
FORMAT = "eurotrain-tokens"
VERSION = 1


class DataFormatError(DataError):
    """A prepared directory is missing, incomplete, corrupted or inconsistent."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of the vocabulary."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def scan_file(path: Path, dtype: np.dtype | None, chunk: int = 1 << 24) -> tuple[str, int]:
    """SHA-256 of a file and, given a token dtype, its largest token id (-1 when there is none),
    from one read."""
    h = hashlib.sha256()
    largest = -1
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if dtype is not None and len(block) >= dtype.itemsize:
                usable = len(block) - len(block) % dtype.itemsize
                largest = max(
                    largest, int(np.frombuffer(block, dtype, usable // dtype.itemsize).max())
                )
    return h.hexdigest(), largest


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


MAX_MANIFEST = 1 << 28
"""Bytes a manifest may hold: about 350 per shard, so some 750,000 shards (of 1 GiB of text each
by default)."""
TOKEN_DTYPES = ("uint16", "uint32")


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of a prepared directory, or None when there is none yet. Everything the
    reader relies on is checked: a manifest comes with the data, from whoever prepared it."""
    f = path / MANIFEST
    if not f.exists():
        return None
    try:
        st = f.stat()
        if not stat.S_ISREG(st.st_mode):
            raise DataFormatError(f"{f} is not a regular file: remove it or prepare the data again")
        if st.st_size > MAX_MANIFEST:
            raise DataFormatError(
                f"{f} holds {st.st_size:,} bytes, more than any manifest "
                f"(at most {MAX_MANIFEST:,}): it is not a eurotrain manifest"
            )
        manifest = json.loads(f.read_bytes())
    except (ValueError, RecursionError) as e:  # JSON, UTF-8, or nesting beyond the parser
        raise DataFormatError(
            f"{f} is not valid JSON ({unreadable(e)}): the manifest is damaged; prepare the data again"
        ) from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or manifest.get("version") != VERSION
    ):
        raise DataFormatError(
            f"{f} is not a eurotrain prepared-data manifest (format {FORMAT!r} version {VERSION})"
        )
    problem = manifest_problem(manifest)
    if problem:
        raise DataFormatError(
            f"{f}: {problem}; the manifest is damaged or was not written by 'eurotrain data "
            f"prepare': prepare the data again"
        )
    return manifest


def manifest_problem(m: dict[str, Any]) -> str | None:
    """What is wrong with a manifest's fields (names, types, ranges), or None."""
    try:
        tok = _get(m, "tokenizer", dict, "")
        for key in ("name", "sha256"):
            _get(tok, key, str, "tokenizer")
        vocab = _get(tok, "vocab_size", int, "tokenizer")
        if not 1 <= vocab <= 2**32:
            return f"tokenizer.vocab_size is {vocab}, not in [1, 2**32]"
        eos = _get(tok, "eos_id", int, "tokenizer")
        if not 0 <= eos < vocab:
            return f"tokenizer.eos_id is {eos}, not a token of its {vocab} (0..{vocab - 1})"
        dtype = _get(m, "dtype", str, "")
        if dtype not in TOKEN_DTYPES:
            return f"dtype is {shown(dtype)}, not one of {TOKEN_DTYPES}"
        if np.dtype(dtype).itemsize < token_dtype(vocab).itemsize:
            return f"dtype {dtype} cannot hold the ids of a vocabulary of {vocab}"
        for i, entry in enumerate(_get(m, "inputs", list, "")):
            where = f"inputs[{i}]"
            for key, kind in (("key", str), ("spec", str), ("complete", bool)):
                _get(entry, key, kind, where)
            if _get(entry, "shard_chars", int, where) < 1:
                return f"{where}.shard_chars is {entry['shard_chars']}, not a positive number"
        for i, s in enumerate(_get(m, "shards", list, "")):
            where = f"shards[{i}]"
            for key in ("file", "index_file"):
                name = _get(s, key, str, where)
                if name in ("", ".", "..") or "/" in name or "\0" in name:
                    return (
                        f"{where}.{key} is {shown(name)}: a shard must be a file of the prepared "
                        f"directory itself (a plain name)"
                    )
            for key in ("sha256", "index_sha256", "input"):
                _get(s, key, str, where)
            tokens = _get(s, "num_tokens", int, where)
            docs = _get(s, "num_documents", int, where)
            part = _get(s, "part", int, where)
            if min(tokens, docs, part) < 0 or docs > tokens or (docs == 0) != (tokens == 0):
                return (
                    f"{where} holds {tokens} tokens in {docs} documents (part {part}): counts "
                    f"must be >= 0 and every document holds at least one token"
                )
    except _FieldError as e:
        return str(e)
    return None


class _FieldError(Exception):
    pass


def _get(obj: Any, key: str, kind: type, where: str) -> Any:
    """``obj[key]``, which must be a ``kind`` (an int is never a bool)."""
    name = f"{where}.{key}" if where else key
    if not isinstance(obj, dict):
        raise _FieldError(f"{where or 'the manifest'} is {type(obj).__name__}, not an object")
    if key not in obj:
        raise _FieldError(f"{name} is missing")
    v = obj[key]
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise _FieldError(f"{name} is {shown(v)}, not {kind.__name__}")
    return v


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    manifest["num_tokens"] = sum(s["num_tokens"] for s in manifest["shards"])
    manifest["num_documents"] = sum(s["num_documents"] for s in manifest["shards"])
    _write_atomic(path / MANIFEST, json.dumps(manifest, indent=1).encode())


def index_problem(ends: np.ndarray, size: int) -> str | None:
    """What is wrong with a shard's document ends (each document holds >= 1 token, the last
    ends the shard), or None."""
    bad = (np.diff(ends, prepend=0) < 1) | (ends > size)
    if bad.any():
        k = int(np.argmax(bad))
        if ends[k] > size:
            return f"document {k:,} ends at {int(ends[k]):,}, beyond the shard"
        after = f"after {int(ends[k - 1]):,}" if k else "at the start"
        return f"document {k:,} ends at {int(ends[k]):,}, {after}"
    if not len(ends) or ends[-1] != size:
        return f"the last document ends at {int(ends[-1]) if len(ends) else 0:,}, not {size:,}"
    return None


class TokenRangeError(DataFormatError):
    """Data holds a token id outside its tokenizer's vocabulary (a shard prepared with another
    tokenizer, or forged). Raised on open (``verify: checksum``) or by the rank that reads it."""

    every_rank = False


def out_of_vocabulary(where: str, at: str, token: int, vocab_size: int) -> TokenRangeError:
    return TokenRangeError(
        f"{where} holds token id {token} at {at}, outside the vocabulary of the tokenizer it "
        f"was prepared with (ids 0..{vocab_size - 1}): its tokens were not written by that "
        f"tokenizer; prepare the data again"
    )


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
        self._shards = shards
        for s in shards:
            self._check_shard(s)
        if verify == "checksum":
            self.verify_share()
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

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def verify_share(self, rank: int = 0, world: int = 1, offset: int = 0) -> list[str]:
        """Check the SHA-256 and the token ids of every ``world``-th shard, from ``rank``
        (shard i is this rank's when (i + offset) % world == rank): ranks split the reading of
        a large corpus instead of each reading all of it. Returns the shard files checked."""
        checked = []
        for i, s in enumerate(self._shards):
            if (i + offset) % world == rank:
                self._scan_shard(s)
                checked.append(s["file"])
        return checked

    def _check_shard(self, s: dict[str, Any]) -> None:
        """Both files of a shard: present, regular, of the size the manifest gives."""
        for key, expected in (
            ("file", s["num_tokens"] * self.dtype.itemsize),
            ("index_file", s["num_documents"] * 8),
        ):
            f = self.path / s[key]
            if not f.exists():
                raise DataFormatError(
                    f"{f} is missing (listed in {self.path / MANIFEST}); restore it or prepare "
                    f"the data again"
                )
            st = f.stat()
            if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would hang or never end
                raise DataFormatError(
                    f"{f} is not a regular file (listed in {self.path / MANIFEST}); replace it "
                    f"with the shard or prepare the data again"
                )
            if st.st_size != expected:
                raise DataFormatError(
                    f"{f} has {st.st_size} bytes but the manifest expects {expected}: the shard "
                    f"is truncated or damaged; restore it or prepare the data again"
                )

    def _scan_shard(self, s: dict[str, Any]) -> None:
        """Both files of a shard against their SHA-256, and its token ids against the
        vocabulary, in one read."""
        vocab = self.tokenizer["vocab_size"]
        for key, sum_key in (("file", "sha256"), ("index_file", "index_sha256")):
            f = self.path / s[key]
            digest, largest = scan_file(f, self.dtype if key == "file" else None)
            if digest != s[sum_key]:
                raise DataFormatError(
                    f"{f} fails its SHA-256 check against {self.path / MANIFEST}: the shard is "
                    f"corrupted; restore it or prepare the data again"
                )
            if largest >= vocab:
                at = int(np.argmax(np.memmap(f, dtype=self.dtype, mode="r") >= vocab))
                raise out_of_vocabulary(str(f), f"token {at:,}", largest, vocab)

    @property
    def doc_ends(self) -> np.ndarray:
        """End offsets (exclusive) of every document in the whole token stream, checked: each
        shard's ends rise strictly and its last is the shard's end."""
        if self._doc_ends is None:
            parts = []
            for f, start, stop in zip(self._index_files, self.starts[:-1], self.starts[1:]):
                ends = np.fromfile(f, dtype="<i8")
                size = int(stop - start)
                problem = index_problem(ends, size)
                if problem:
                    raise DataFormatError(
                        f"{f} does not index its shard of {size:,} tokens ({problem}): the "
                        f"index is damaged; prepare the data again"
                    )
                parts.append(ends + start)
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
