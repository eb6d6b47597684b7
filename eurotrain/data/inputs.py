"""The raw inputs of ``eurotrain data prepare``: which files, of which kind, read strictly.

Plain text and JSON lines are read here rather than by ``datasets``' loaders, in one pass in the
main process, so that anything malformed stops the preparation with the file, the line and the
fix ("data.jsonl line 17: not valid JSON (...)", "b.txt line 2: not UTF-8 text (byte 0xe9 at
offset 12)", "field 'text' is a list"), and a column whose type changes between lines is an
error, not a silent conversion. The tokenizer workers only ever see checked strings. Parquet
files are checked by their schema, then read by ``datasets``.
"""

from __future__ import annotations

import codecs
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from eurotrain.data.corpus import TEXT_SUFFIXES, expand_paths
from eurotrain.errors import ConfigError, DataError

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
CHUNK_BYTES = 16 << 20
"""Text files are decoded in chunks of about this size (cut at line ends)."""

_CONVERT = "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8) or leave it out"
_FIX_LINE = "fix or drop that line"


def kind_of(path: Path) -> str:
    """ "text", "json" or "parquet", by the file's name."""
    name = path.name.lower()
    if name.endswith(JSON_SUFFIXES):
        return "json"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    raise ConfigError(
        f"--input: {path} has an unknown type; use plain text ({', '.join(TEXT_SUFFIXES)}), "
        f"JSONL ({', '.join(JSON_SUFFIXES)}), Parquet (.parquet) or a save_to_disk directory. "
        f"Move other files out of the input directory, or pick the inputs with a glob such as "
        f"'{path.parent}/*.jsonl'"
    )


def resolve_files(spec: str) -> list[Path]:
    """The input files of a path, a directory (recursively) or a glob, sorted."""
    files = expand_paths(spec, lambda f: not f.name.startswith("."))
    if not files:
        raise ConfigError(
            f"--input: {spec!r} matches no files; give a file, a directory, a glob such as "
            f"'/data/corpus/*.jsonl', or a directory written by Dataset.save_to_disk"
        )
    return files


def generate_documents(
    files: list[str], kind: str, field: str, unit: str, spec: str, key: str
) -> Iterator[dict[str, str | None]]:
    """Every document of ``files`` as {"text": ...}, for ``datasets.Dataset.from_generator``
    (``key`` names the input's version, so a changed file is read again, not taken from the
    cache)."""
    if kind == "text":
        for f in files:
            for doc in text_documents(Path(f), unit):
                yield {"text": doc}
        return
    keys: list[str] | None = None  # of the first record, for the error when no record has field
    found = False
    for f in files:
        for record, where in json_records(Path(f)):
            if not isinstance(record, dict):
                if isinstance(record, str):  # a JSON list of strings: each one a document
                    found = True
                    yield {"text": record}
                    continue
                raise DataError(
                    f"{where}: a JSON {_json_type(record)}, not an object with a {field!r} "
                    f"field; {_FIX_LINE}"
                )
            keys = list(record) if keys is None else keys
            value = record.get(field)
            found = found or field in record
            if value is not None and not isinstance(value, str):
                raise DataError(
                    f"{where}: field {field!r} is {_a(_json_type(value))}, not a string; {_FIX_LINE}"
                )
            yield {"text": value}
    if not found:
        raise ConfigError(
            f"--text-field: {spec!r} has no column {field!r}; its columns are {keys or []}"
        )


def text_documents(path: Path, unit: str) -> Iterator[str]:
    """The documents of a UTF-8 text file: the whole file, each line, or each blank-line
    separated paragraph ("\\r\\n" and "\\r" read as "\\n", as Python's text mode does)."""
    if unit == "document":
        yield _newlines(_decode(path, path.read_bytes(), 0, 1))
        return
    offset, line, carry = 0, 1, ""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            chunk += f.readline()  # end at a line end: never inside a UTF-8 sequence
            text = _newlines(_decode(path, chunk, offset, line))
            offset, line = offset + len(chunk), line + chunk.count(b"\n")
            if unit == "line":
                lines = text.split("\n")
                if text.endswith("\n"):
                    lines.pop()
                yield from lines
            else:
                parts = (carry + text).split("\n\n")
                carry = parts.pop()
                yield from (p for p in parts if p)
    if carry:
        yield carry


def json_records(path: Path) -> Iterator[tuple[Any, str]]:
    """(record, "file line N") for each non-blank line of a JSON-lines file, or for each item
    of a file that holds one JSON list; gzip-compressed when the name ends in .gz."""
    try:
        with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as f:
            first = f.read(4096)
            start = len(codecs.BOM_UTF8) if first.startswith(codecs.BOM_UTF8) else 0
            if first[start:].lstrip().startswith(b"["):
                yield from _json_list(path, first + f.read(), start)
                return
            f.seek(start)
            offset = start
            for number, raw in enumerate(f, 1):
                begin, offset = offset, offset + len(raw)
                if raw.strip():
                    yield _json_line(path, raw, number, begin), f"{path} line {number}"
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(
            f"{path}: not a readable gzip file ({e}); recompress it or leave it out"
        ) from None


def _json_line(path: Path, raw: bytes, number: int, offset: int) -> Any:
    text = _decode(path, raw, offset, number)
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {number}: not valid JSON ({e.msg}); {_FIX_LINE}") from None
    if "\\ud" in text.lower():  # an escaped surrogate: only a complete pair is text
        _check_surrogates(record, f"{path} line {number}")
    return record


def _json_list(path: Path, data: bytes, start: int) -> Iterator[tuple[Any, str]]:
    text = _decode(path, data[start:], start, 1)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg}); fix the file") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: a JSON {_json_type(items)}, not a list of records")
    for i, item in enumerate(items):
        where = f"{path} item {i}"
        if "\\ud" in text.lower():
            _check_surrogates(item, where)
        yield item, where


def _check_surrogates(record: Any, where: str) -> None:
    values = record.values() if isinstance(record, dict) else [record]
    for value in values:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(
                    f"{where}: a lone surrogate escape (\\u{ord(value[e.start]):04x}) is no "
                    f"text; {_FIX_LINE}"
                ) from None


def _decode(path: Path, data: bytes, offset: int, line: int) -> str:
    """``data`` (read from ``offset`` of the file, starting on line ``line``) as text."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = line + data.count(b"\n", 0, e.start)
        raise DataError(
            f"{path} line {at}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
            f"{offset + e.start}); {_CONVERT}"
        ) from None
    nul = data.find(b"\x00")
    if nul >= 0:  # valid UTF-8, but no text: a binary file, or UTF-16
        at = line + data.count(b"\n", 0, nul)
        raise DataError(
            f"{path} line {at}: a NUL byte at offset {offset + nul}: binary data (or UTF-16), "
            f"not UTF-8 text; convert the file to UTF-8 or leave it out"
        )
    return text


def _newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "list"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if value is None:
        return "null"
    return "string"


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"
