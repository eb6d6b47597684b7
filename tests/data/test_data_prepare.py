"""`eurotrain data prepare`: exact round trips for every input format, resume, and errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from eurotrain.configtools import ConfigError
from eurotrain.data import DataConfig, DataPipeline, PreparedDataset, SourceConfig, load_tokenizer
from eurotrain.data.prepare import main, prepare
from eurotrain.data.shards import DataFormatError


def detokenize(path: Path, tokenizer_spec: str) -> list[str]:
    """Every document of a prepared directory, decoded (the end-of-document token dropped)."""
    ds = PreparedDataset(path)
    tok = load_tokenizer(tokenizer_spec)
    tokens = ds.read_rows(np.array([0]), ds.num_tokens)[0]
    ends = ds.doc_ends
    starts = np.concatenate(([0], ends[:-1]))
    assert (tokens[ends - 1] == tok.eos_id).all(), "every document ends with end-of-document"
    return [tok.decode(tokens[a : b - 1].tolist()) for a, b in zip(starts, ends)]


def test_byte_round_trip_text_files(prepared_byte, docs):
    ds = PreparedDataset(prepared_byte)
    assert len(ds.manifest["shards"]) > 1, "the small shard size must give several shards"
    assert ds.dtype == np.uint16 and ds.tokenizer["name"] == "byte"
    assert ds.num_documents == len(docs)
    assert detokenize(prepared_byte, "byte") == docs


def test_bpe_round_trip_jsonl_two_workers(tmp_path, docs, bpe_dir):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "content": d}) + "\n" for i, d in enumerate(docs)))
    out = tmp_path / "out"
    prepare(str(src), str(bpe_dir), str(out), workers=2, text_field="content", shard_size_mb=0.005)
    ds = PreparedDataset(out)
    assert ds.tokenizer["vocab_size"] == len(load_tokenizer(str(bpe_dir)).tok)
    assert ds.num_tokens < sum(len(d.encode()) for d in docs), "BPE must compress"
    assert detokenize(out, str(bpe_dir)) == docs


def test_parquet_and_saved_dataset_round_trip(tmp_path, docs):
    import datasets

    dset = datasets.Dataset.from_dict({"text": docs, "n": list(range(len(docs)))})
    dset.to_parquet(str(tmp_path / "in.parquet"))
    dset.save_to_disk(str(tmp_path / "saved"))
    for name in ("in.parquet", "saved"):
        out = tmp_path / f"out-{name}"
        prepare(str(tmp_path / name), "byte", str(out), workers=1)
        assert detokenize(out, "byte") == docs, name


def test_interrupted_prepare_resumes_keeping_completed_shards(tmp_path, text_dir, docs):
    out = tmp_path / "out"
    prepare(str(text_dir), "byte", str(out), workers=1, shard_size_mb=0.01)
    full = json.loads((out / "manifest.json").read_text())
    assert len(full["shards"]) >= 3
    # The state an interruption leaves: the last shard never written, a stray temporary file,
    # the input not complete. (Shards and manifest are written by atomic rename.)
    cut = dict(full, shards=full["shards"][:-1])
    cut["inputs"] = [dict(full["inputs"][0], complete=False)]
    (out / "manifest.json").write_text(json.dumps(cut))
    last = full["shards"][-1]
    (out / last["file"]).unlink()
    (out / (last["file"] + ".tmp")).write_bytes(b"partial")
    with pytest.raises(DataFormatError, match="interrupted"):
        PreparedDataset(out)
    kept = {s["file"]: (out / s["file"]).stat().st_mtime_ns for s in cut["shards"]}

    assert main(["prepare", "--input", str(text_dir), "--tokenizer", "byte",
                 "--output", str(out), "--workers", "1", "--shard-size-mb", "0.01"]) == 0  # fmt: skip
    assert {f: (out / f).stat().st_mtime_ns for f in kept} == kept, "completed shards rewritten"
    assert json.loads((out / "manifest.json").read_text())["shards"] == full["shards"]
    assert detokenize(out, "byte") == docs


def test_appending_another_input_and_refusing_another_tokenizer(tmp_path, text_dir, bpe_dir):
    out = tmp_path / "out"
    prepare(str(text_dir), "byte", str(out), workers=1)
    extra = tmp_path / "extra.txt"
    extra.write_text("one more document")
    prepare(str(extra), "byte", str(out), workers=1)
    assert detokenize(out, "byte")[-1] == "one more document"
    with pytest.raises(ConfigError, match="prepared with tokenizer byte"):
        prepare(str(extra), str(bpe_dir), str(out), workers=1)


def test_sources_with_different_tokenizers_are_refused(tmp_path, prepared_byte, docs, bpe_dir):
    src = tmp_path / "in.txt"
    src.write_text(docs[0])
    prepare(str(src), str(bpe_dir), str(tmp_path / "bpe"), workers=1)
    cfg = DataConfig(
        sources=[SourceConfig(str(prepared_byte)), SourceConfig(str(tmp_path / "bpe"))]
    )
    with pytest.raises(ConfigError, match="share one tokenizer"):
        DataPipeline(cfg)


def test_corrupted_and_truncated_shards_are_detected(tmp_path, prepared_byte):
    bad = tmp_path / "bad"
    shutil.copytree(prepared_byte, bad)
    shard = bad / "shard-00001.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0x01  # one flipped bit, same size
    shard.write_bytes(bytes(data))
    PreparedDataset(bad, verify="size")  # the size check alone cannot see it
    with pytest.raises(DataFormatError, match=r"shard-00001\.bin fails its SHA-256 check"):
        PreparedDataset(bad)
    with pytest.raises(ConfigError, match=r"data\.sources: .*SHA-256"):
        DataPipeline(DataConfig(sources=[SourceConfig(str(bad))]))
    assert main(["verify", str(bad)]) == 2

    shard.write_bytes(bytes(data[:-7]))
    with pytest.raises(DataFormatError, match="truncated"):
        PreparedDataset(bad, verify="size")


def test_empty_inputs_give_clear_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    (empty / "b.txt").write_text("")
    with pytest.raises(ConfigError, match="holds no text"):
        prepare(str(empty), "byte", str(tmp_path / "o1"), workers=1)
    jsonl = tmp_path / "e.jsonl"
    jsonl.write_text('{"text": ""}\n{"text": ""}\n')
    with pytest.raises(ConfigError, match="holds no text"):
        prepare(str(jsonl), "byte", str(tmp_path / "o2"), workers=1)
    rc = main(["prepare", "--input", str(tmp_path / "nothing-*.jsonl"), "--tokenizer", "byte",
               "--output", str(tmp_path / "o3")])  # fmt: skip
    assert rc == 2 and "matches no files" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no column 'body'"):
        prepare(str(jsonl), "byte", str(tmp_path / "o4"), text_field="body")
