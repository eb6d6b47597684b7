"""`eurotrain data prepare`: exact round trips for every input format, resume, and errors."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eurotrain.configtools import ConfigError
from eurotrain.data import DataConfig, DataPipeline, PreparedDataset, SourceConfig, load_tokenizer
from eurotrain.data import prepare as prepare_module
from eurotrain.data.prepare import main, prepare
from eurotrain.data.shards import DataFormatError

REPO = Path(__file__).resolve().parents[2]


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


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if re.match(r"eurotrain( [a-z]+)*: ", line)]


GOOD = "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(16))
BAD_INPUTS = {
    # name: (files to write, the one line the command must print (after the file's path))
    "malformed JSON": (
        {"data.jsonl": GOOD + '{"text": "a" "b"}\n'},
        "data.jsonl line 17: not valid JSON (Expecting ',' delimiter); fix or drop that line",
    ),
    "a list": (
        {"data.jsonl": '{"text": "a"}\n\n{"text": ["b"]}\n'},
        "data.jsonl line 3: field 'text' is a list, not a string; fix or drop that line",
    ),
    "a number after strings": (
        {"data.jsonl": '{"text": "a"}\n{"text": 5}\n'},
        "data.jsonl line 2: field 'text' is a number, not a string; fix or drop that line",
    ),
    "no object": (
        {"data.jsonl": '{"text": "a"}\n["b"]\n'},
        "data.jsonl line 2: a JSON list, not an object with a 'text' field; fix or drop that line",
    ),
    "latin-1 JSON": (
        {"data.jsonl": b'{"text": "a"}\n{"text": "caf\xe9"}\n'},
        "data.jsonl line 2: not UTF-8 text (byte 0xe9 at offset 27); convert the file to UTF-8 "
        "(e.g. iconv -f latin1 -t utf-8) or leave it out",
    ),
    "latin-1 text in a directory": (
        {"dir/a.txt": "fine", "dir/b.txt": b"line one\ncaf\xe9\n"},
        "b.txt line 2: not UTF-8 text (byte 0xe9 at offset 12); convert the file to UTF-8 "
        "(e.g. iconv -f latin1 -t utf-8) or leave it out",
    ),
    "binary with a text suffix": (
        {"dir/a.txt": "fine", "dir/image.txt": b"\x89PNG\r\n\x1a\n\x00\x00"},
        "image.txt line 1: not UTF-8 text (byte 0x89 at offset 0); convert the file to UTF-8 "
        "(e.g. iconv -f latin1 -t utf-8) or leave it out",
    ),
    "NUL bytes": (
        {"dir/a.txt": "fine", "dir/utf16.txt": "hi".encode("utf-16-le")},
        "utf16.txt line 1: a NUL byte at offset 1: binary data (or UTF-16), not UTF-8 text; "
        "convert the file to UTF-8 or leave it out",
    ),
    "a binary file in a directory": (
        {"dir/a.txt": "fine", "dir/logo.png": b"\x89PNG\r\n"},
        "logo.png has an unknown type",
    ),
}


def write_inputs(root: Path, files: dict[str, str | bytes]) -> str:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    first = next(iter(files))
    return str(root / first.split("/")[0])


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_files_are_one_line_naming_file_and_line(tmp_path, capsys, case):
    files, expected = BAD_INPUTS[case]
    spec = write_inputs(tmp_path / "in", files)
    out = tmp_path / "out"
    rc = main(["prepare", "--input", spec, "--tokenizer", "byte", "--output", str(out),
               "--workers", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    (line,) = error_lines(err)
    assert line.startswith("eurotrain data prepare: ") and expected in line, line
    assert not out.exists(), "a failed first preparation leaves no output directory"


def test_bad_jsonl_under_the_cli_with_worker_processes_is_one_line(tmp_path):
    files, _ = BAD_INPUTS["a list"]
    spec = write_inputs(tmp_path, {"big.jsonl": GOOD * 40 + files["data.jsonl"]})
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "eurotrain", "data", "prepare", "--input", spec, "--tokenizer",
         "byte", "--output", str(out), "--workers", "2", "--shard-size-mb", "0.001"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert error_lines(proc.stderr) == [
        f"eurotrain data prepare: data error: {spec} line 643: field 'text' is a list, not a "
        f"string; fix or drop that line"
    ]
    assert not out.exists()


def test_output_that_is_a_file_is_one_line(tmp_path, text_dir, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    rc = main(["prepare", "--input", str(text_dir), "--tokenizer", "byte", "--output", str(afile)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert error_lines(err) == [
        f"eurotrain data prepare: configuration error: --output: {str(afile)!r} is a file, not "
        f"a directory; choose a new or prepared directory"
    ]


def test_failed_prepare_leaves_no_work_dir_and_keeps_recorded_shards(
    tmp_path, text_dir, docs, prepared_byte, monkeypatch
):
    """The disk fills up while shard 2 is written: shards 0 and 1 stay recorded, nothing
    temporary stays; the same command, rerun, finishes the directory byte for byte."""
    real = prepare_module.write_shard

    def full_disk_at_shard_2(out_dir, number, tokens, doc_ends):
        if number == 2:
            (out_dir / "shard-00002.bin.tmp").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(out_dir, number, tokens, doc_ends)

    out = tmp_path / "out"
    monkeypatch.setattr(prepare_module, "write_shard", full_disk_at_shard_2)
    with pytest.raises(OSError, match="No space left"):
        prepare(str(text_dir), "byte", str(out), workers=1, shard_size_mb=0.01)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.bin", "shard-00001.bin"]
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "shard-00000.bin", "shard-00000.idx", "shard-00001.bin",
        "shard-00001.idx",
    ]  # fmt: skip
    monkeypatch.setattr(prepare_module, "write_shard", real)
    prepare(str(text_dir), "byte", str(out), workers=1, shard_size_mb=0.01)
    assert not (out / ".work").exists()
    full = json.loads((prepared_byte / "manifest.json").read_text())
    assert json.loads((out / "manifest.json").read_text())["shards"] == full["shards"]
    assert detokenize(out, "byte") == docs


def test_rerun_of_a_finished_preparation_leaves_nothing_behind(tmp_path, text_dir):
    out = tmp_path / "out"
    prepare(str(text_dir), "byte", str(out), workers=1)
    before = sorted(p.name for p in out.iterdir())
    prepare(str(text_dir), "byte", str(out), workers=1)
    assert sorted(p.name for p in out.iterdir()) == before and ".work" not in before


def test_inputs_split_into_the_same_documents_as_the_datasets_loaders(tmp_path, monkeypatch):
    """The strict readers cut text and JSON into exactly the documents that datasets' loaders
    (which prepare used before) gave, so directories prepared before stay resumable."""
    import gzip

    import datasets

    from eurotrain.data import inputs

    monkeypatch.setattr(inputs, "CHUNK_BYTES", 5)  # chunk edges everywhere
    text = tmp_path / "t.txt"
    text.write_bytes(b"\xef\xbb\xbfa\r\nb\rc\n\n\n\npara two\nstill\n\nx\x0by\xe2\x80\xa8z\n\nend")
    for unit in ("document", "line", "paragraph"):
        before = datasets.load_dataset(
            "text", data_files=[str(text)], split="train", sample_by=unit,
            cache_dir=str(tmp_path / "cache"),
        )["text"]  # fmt: skip
        assert list(inputs.text_documents(text, unit)) == before, unit
    records = [{"text": "a\nb"}, {"text": None}, {"id": 3}, {"text": "ü €", "n": 1}]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n\n" for r in records)
    (tmp_path / "l.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode())
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "z.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    for name in ("l.jsonl", "a.json", "z.jsonl.gz"):
        path = str(tmp_path / name)
        before = datasets.load_dataset(
            "json", data_files=[path], split="train", cache_dir=str(tmp_path / "cache")
        )["text"]
        ours = inputs.generate_documents([path], "json", "text", "document", path, "")
        assert [d["text"] for d in ours] == before, name


def test_an_input_keeps_its_key_so_older_directories_resume(tmp_path, docs):
    """The manifest's input key (how a rerun finds what it already did) is the one the
    datasets-based reader wrote: files, sizes and times, and the text field."""
    import hashlib

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"content": d}) + "\n" for d in docs[:5]))
    manifest = prepare(str(src), "byte", str(tmp_path / "out"), workers=1, text_field="content")
    st = src.stat()
    h = hashlib.sha256(b"json:document")
    h.update(f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    assert manifest["inputs"][0]["key"] == f"files:{h.hexdigest()}:content"
