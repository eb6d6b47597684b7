"""``eurotrain data prepare``: tokenize a corpus once into memory-mapped token shards.

Inputs: plain text files (one document per file, line or paragraph), JSONL/JSON (a named text
field), Parquet, or a ``datasets`` dataset saved with ``save_to_disk``. The documents are cut
into shards of about ``--shard-size-mb`` of text, planned before any tokenizing; each shard is
tokenized in parallel (``datasets.map`` with ``num_proc`` workers), written atomically and then
recorded in the manifest. A rerun of the same command skips the shards already recorded, so an
interrupted preparation resumes; a different input is appended to the same directory, but only
when it uses the same tokenizer. However it ends (done, an error, Ctrl-C), the command removes
its temporary files; a hard kill leaves ``.work/`` (the read input), which a rerun reuses.

Text and JSON inputs are read and checked by ``eurotrain.data.inputs``: a malformed file stops
the command with one line naming the file and line.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from eurotrain.configtools import ConfigError
from eurotrain.data.inputs import generate_documents, kind_of, resolve_files
from eurotrain.data.shards import (
    FORMAT,
    MANIFEST,
    VERSION,
    DataFormatError,
    PreparedDataset,
    read_manifest,
    token_dtype,
    write_manifest,
    write_shard,
)
from eurotrain.data.tokenizer import load_tokenizer, tokenizer_identity
from eurotrain.errors import DataError, EurotrainError, run_command

TEXT_TYPES = ("string", "large_string", "string_view", "null")
"""Arrow types of a text column (null: a column with no text at all)."""


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and any(
        (p / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def load_documents(
    spec: str, text_field: str, text_unit: str, split: str, cache_dir: Path
) -> tuple[Any, str]:
    """The input as a ``datasets.Dataset`` with one column (``text_field``), and its identity."""
    import datasets

    p = Path(spec)
    if _is_saved_dataset(p):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ConfigError(f"--split: {p} has splits {list(ds)}, not {split!r}")
            ds = ds[split]
        key = f"disk:{p.resolve()}:{ds._fingerprint}"
        if text_field in ds.column_names:
            _check_text_type(str(p), text_field, ds.data.schema.field(text_field).type)
    else:
        files = resolve_files(spec)
        kinds = {kind_of(f) for f in files}
        if len(kinds) > 1:
            raise ConfigError(
                f"--input: {spec!r} mixes file types {sorted(kinds)}; prepare each type with "
                f"its own command (into the same --output to combine them)"
            )
        kind = kinds.pop()
        h = hashlib.sha256(f"{kind}:{text_unit}".encode())
        for f in files:
            st = f.stat()
            h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        key = f"files:{h.hexdigest()}"
        data_files = [str(f) for f in files]
        if kind == "parquet":
            _check_parquet(files, text_field)
            ds = datasets.load_dataset(
                kind, data_files=data_files, split="train", cache_dir=str(cache_dir)
            )
        else:
            kwargs = dict(files=data_files, kind=kind, field=text_field, unit=text_unit)
            ds = _from_generator(dict(kwargs, spec=spec, key=key), cache_dir)
            if kind == "text":
                text_field = "text"  # plain text has one column, "text" (as in the key before)
            elif text_field != "text":
                ds = ds.rename_column("text", text_field)
    if text_field not in ds.column_names:
        raise ConfigError(
            f"--text-field: {spec!r} has no column {text_field!r}; its columns are "
            f"{ds.column_names}"
        )
    return ds.select_columns([text_field]), f"{key}:{text_field}"


def _from_generator(gen_kwargs: dict[str, Any], cache_dir: Path) -> Any:
    """The checked documents as a Dataset cached under ``cache_dir``; a malformed input raises
    its own error (which datasets would wrap in DatasetGenerationError)."""
    import datasets

    try:
        return datasets.Dataset.from_generator(
            generate_documents,
            gen_kwargs=gen_kwargs,
            features=datasets.Features({"text": datasets.Value("string")}),
            cache_dir=str(cache_dir),
        )
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, EurotrainError):
            raise e.__cause__.with_traceback(None) from None
        raise


def _check_text_type(where: str, field: str, arrow_type: Any) -> None:
    if str(arrow_type) not in TEXT_TYPES:
        raise DataError(
            f"{where}: column {field!r} holds {arrow_type}, not text; name the text column "
            f"with --text-field"
        )


def _check_parquet(files: list[Path], field: str) -> None:
    """Each file is Parquet (its footer reads) and its ``field`` column holds strings."""
    import pyarrow.parquet as pq

    for f in files:
        try:
            schema = pq.read_schema(f)
        except Exception as e:  # pyarrow raises ArrowInvalid or OSError for a foreign file
            raise DataError(f"{f}: not a readable Parquet file ({e}); leave it out") from None
        if field not in schema.names:
            raise ConfigError(
                f"--text-field: {str(f)!r} has no column {field!r}; its columns are {schema.names}"
            )
        _check_text_type(str(f), field, schema.field(field).type)


def plan_shards(ds: Any, field: str, shard_chars: int) -> list[tuple[int, int]]:
    """Contiguous document ranges of about ``shard_chars`` characters each."""
    import pyarrow.compute as pc

    lengths = pc.fill_null(pc.utf8_length(ds.data.column(field)), 0)
    cum = np.cumsum(np.asarray(lengths.to_numpy(zero_copy_only=False), dtype=np.int64))
    if len(cum) == 0 or cum[-1] == 0:
        raise ConfigError("--input holds no text: every document is empty")
    cuts = np.searchsorted(cum, np.arange(shard_chars, int(cum[-1]), shard_chars), "left") + 1
    bounds = [0, *sorted(set(cuts.tolist()) - {0, len(cum)}), len(cum)]
    return list(itertools.pairwise(bounds))


class Encoder:
    """The map function: text -> token ids + end-of-document (empty documents are dropped).

    Picklable; each worker process loads the tokenizer once, on first use."""

    def __init__(self, spec: str, field: str, eos_id: int, dtype: str) -> None:
        self.spec, self.field, self.eos_id, self.dtype = spec, field, eos_id, dtype
        self._tok: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tok": None}

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        texts = [t for t in batch[self.field] if t]
        eos = np.asarray([self.eos_id], dtype=self.dtype)
        if self.spec == "byte":
            ids = [np.frombuffer(t.encode("utf-8"), np.uint8).astype(self.dtype) for t in texts]
        else:
            if self._tok is None:
                self._tok = load_tokenizer(self.spec).tok  # type: ignore[attr-defined]
            enc = self._tok(texts, add_special_tokens=False)["input_ids"] if texts else []
            ids = [np.asarray(e, dtype=self.dtype) for e in enc]
        return {"ids": [np.concatenate((i, eos)) for i in ids]}


def prepare(
    input_spec: str,
    tokenizer_spec: str,
    output: str,
    workers: int = 1,
    text_field: str = "text",
    text_unit: str = "document",
    shard_size_mb: float = 1024,
    split: str = "train",
) -> dict[str, Any]:
    """Tokenize ``input_spec`` into ``output``; returns the manifest. However it ends, no
    temporary file stays behind (shards already recorded in the manifest do)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # compute nodes have no internet
    tokenizer = load_tokenizer(tokenizer_spec)
    out = Path(output)
    created = _make_output(out)
    try:
        return _prepare_into(
            out, input_spec, tokenizer_spec, tokenizer, workers, text_field, text_unit,
            shard_size_mb, split,
        )  # fmt: skip
    finally:
        _clean_up(out, created)


def _make_output(out: Path) -> bool:
    """Create the output directory; whether it is new."""
    blocker = next((d for d in (out, *out.parents) if d.exists() and not d.is_dir()), None)
    if blocker is not None:
        raise ConfigError(
            f"--output: {str(blocker)!r} is a file, not a directory; choose a new or prepared "
            f"directory"
        )
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    return created


def _clean_up(out: Path, created: bool) -> None:
    """Remove the temporary files of this command and shard files no manifest lists (a write
    cut short); remove the output directory itself if this command made it and left it empty."""
    shutil.rmtree(out / ".work", ignore_errors=True)
    for tmp in [*out.glob("shard-*.tmp"), out / (MANIFEST + ".tmp")]:
        tmp.unlink(missing_ok=True)
    try:
        manifest = read_manifest(out)
    except DataFormatError:  # damaged: leave everything for the user to look at
        return
    listed = {s[k] for s in (manifest or {}).get("shards", []) for k in ("file", "index_file")}
    for shard in [*out.glob("shard-*.bin"), *out.glob("shard-*.idx")]:
        if shard.name not in listed:
            shard.unlink()
    if created:
        with contextlib.suppress(OSError):  # not empty: it holds what a rerun resumes from
            out.rmdir()


def _prepare_into(
    out: Path,
    input_spec: str,
    tokenizer_spec: str,
    tokenizer: Any,
    workers: int,
    text_field: str,
    text_unit: str,
    shard_size_mb: float,
    split: str,
) -> dict[str, Any]:
    import datasets

    identity: dict[str, Any] = tokenizer_identity(tokenizer_spec, tokenizer)
    manifest = read_manifest(out)
    if manifest is None:
        manifest = {"format": FORMAT, "version": VERSION, "tokenizer": identity}
        manifest.update(dtype=token_dtype(tokenizer.vocab_size).name, inputs=[], shards=[])
    elif manifest["tokenizer"]["sha256"] != identity["sha256"]:
        raise ConfigError(
            f"--output {out} was prepared with tokenizer {manifest['tokenizer']['name']} "
            f"(sha256 {manifest['tokenizer']['sha256'][:12]}), not {identity['name']} "
            f"(sha256 {identity['sha256'][:12]}): one directory holds one tokenizer's tokens; "
            f"choose another --output or the same --tokenizer"
        )
    work = out / ".work"
    ds, key = load_documents(input_spec, text_field, text_unit, split, work / "cache")
    field = ds.column_names[0]
    entry = next((i for i in manifest["inputs"] if i["key"] == key), None)
    if entry is None:
        shard_chars = max(1, int(shard_size_mb * 2**20))
        entry = {"key": key, "spec": input_spec, "shard_chars": shard_chars, "complete": False}
        manifest["inputs"].append(entry)
    if entry["complete"]:
        print(f"{input_spec}: already prepared in {out}; nothing to do", flush=True)
        return manifest
    plan = plan_shards(ds, field, entry["shard_chars"])
    done = {s["part"] for s in manifest["shards"] if s["input"] == key}
    encoder = Encoder(tokenizer_spec, field, tokenizer.eos_id, manifest["dtype"])
    features = datasets.Features({"ids": datasets.Sequence(datasets.Value(manifest["dtype"]))})
    start = time.perf_counter()
    new_tokens = 0
    for part, (a, b) in enumerate(plan):
        if part in done:
            continue
        sub = ds.select(range(a, b))
        num_proc = min(workers, len(sub))
        mapped = sub.map(
            encoder,
            batched=True,
            batch_size=256,
            num_proc=num_proc if num_proc > 1 else None,
            remove_columns=[field],
            features=features,
            new_fingerprint=hashlib.sha256(
                f"{key}:{part}:{identity['sha256']}".encode()
            ).hexdigest()[:32],
            cache_file_name=str(work / f"part-{part:05d}.arrow"),
            desc=f"tokenizing shard {part + 1}/{len(plan)}",
        )
        column = mapped.data.column("ids")
        lengths = np.concatenate(
            [c.value_lengths().to_numpy(zero_copy_only=False) for c in column.chunks] or [[]]
        ).astype(np.int64)
        tokens = np.concatenate(
            [c.flatten().to_numpy() for c in column.chunks] or [np.zeros(0, manifest["dtype"])]
        ).astype(manifest["dtype"], copy=False)
        del mapped, column
        number = len(manifest["shards"])
        shard = write_shard(out, number, tokens, np.cumsum(lengths))
        shard.update(input=key, part=part)
        manifest["shards"].append(shard)
        write_manifest(out, manifest)
        new_tokens += len(tokens)
        for f in work.glob(f"part-{part:05d}*.arrow"):
            f.unlink()
    entry["complete"] = True
    write_manifest(out, manifest)
    if manifest["num_tokens"] == 0:
        raise ConfigError(f"--input {input_spec!r} holds no text: every document is empty")
    elapsed = time.perf_counter() - start
    print(
        f"prepared {input_spec} -> {out}: {manifest['num_tokens']:,} tokens in "
        f"{manifest['num_documents']:,} documents, {len(manifest['shards'])} shards "
        f"({new_tokens / max(elapsed, 1e-9) / max(workers, 1):,.0f} tokens/s per worker)",
        flush=True,
    )
    return manifest


def verify_prepared(path: str) -> PreparedDataset:
    """Open a prepared directory with every size, checksum, token id and document index
    checked."""
    ds = PreparedDataset(path, verify="checksum")
    _ = ds.doc_ends
    return ds


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="eurotrain data", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize a corpus into memory-mapped token shards")
    p.add_argument("--input", required=True, help="file, directory, glob or save_to_disk dir")
    p.add_argument("--tokenizer", required=True, help='"byte" or a local HF tokenizer path')
    p.add_argument("--output", required=True, help="directory for shards and manifest.json")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--text-field", default="text", help="JSONL/Parquet/dataset text column")
    p.add_argument(
        "--text-unit",
        default="document",
        choices=["document", "line", "paragraph"],
        help="plain text: one document per file, per line, or per blank-line paragraph",
    )
    p.add_argument("--shard-size-mb", type=float, default=1024, help="text per shard (MiB)")
    p.add_argument("--split", default="train", help="split of a saved DatasetDict")
    v = sub.add_parser(
        "verify", help="check a prepared directory's sizes, checksums, token ids and indexes"
    )
    v.add_argument("path")
    return ap


def main(argv: list[str] | None = None) -> int:
    """A fixable error (bad input, a full disk) is one line on stderr and a non-zero exit code."""
    args = _parser().parse_args(argv)
    return run_command(f"eurotrain data {args.command}", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    if args.command == "verify":
        ds = verify_prepared(args.path)
        print(f"{args.path}: OK, {ds.num_tokens:,} tokens, {ds.num_documents:,} documents")
        return 0
    if args.workers < 1:
        raise ConfigError(f"--workers: {args.workers} must be >= 1")
    prepare(
        args.input,
        args.tokenizer,
        args.output,
        workers=args.workers,
        text_field=args.text_field,
        text_unit=args.text_unit,
        shard_size_mb=args.shard_size_mb,
        split=args.split,
    )
    return 0


__all__ = ["main", "prepare", "verify_prepared"]
