"""Prepared data from a stranger: a manifest vouches for its own checksums, so everything the
reader relies on is checked (fields, file names, file types, token ids, document indexes), and
each failure is one error naming the file and the field, never a traceback, a hang, a file read
from outside the directory, or a crash on a device days into a run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eurotrain.configtools import ConfigError
from eurotrain.data import DataFormatError, PreparedDataset
from eurotrain.data.config import DataConfig, SourceConfig
from eurotrain.data.pipeline import DataPipeline
from eurotrain.data.prepare import main as data_main
from eurotrain.data.prepare import prepare
from eurotrain.data.shards import TokenRangeError, index_problem
from eurotrain.data.tokenizer import load_tokenizer


def copy(prepared: Path, tmp_path: Path, edit: Callable[[Path, dict[str, Any]], Any]) -> Path:
    """A copy of ``prepared`` with ``edit(dir, manifest)`` applied; the checksums of the files
    are signed again, as a forger would."""
    d = tmp_path / "data"
    shutil.copytree(prepared, d)
    m = json.loads((d / "manifest.json").read_text())
    edit(d, m)
    for s in m["shards"] if isinstance(m["shards"], list) else []:
        for key, sum_key in (("file", "sha256"), ("index_file", "index_sha256")):
            name = s.get(key) if isinstance(s, dict) else None
            if isinstance(name, str) and (d / name).is_file():
                f = d / name
                s[sum_key] = hashlib.sha256(f.read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def shard0(m: dict[str, Any]) -> dict[str, Any]:
    return m["shards"][0]


BAD_MANIFESTS: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "path traversal": (
        lambda m: shard0(m).update(file="../../../../etc/hostname"),
        r"shards\[0\]\.file is '\.\./\.\./\.\./\.\./etc/hostname': a shard must be a file of the "
        r"prepared directory itself",
    ),
    "absolute path": (
        lambda m: shard0(m).update(index_file="/etc/hostname"),
        r"shards\[0\]\.index_file is '/etc/hostname'",
    ),
    "float dtype": (lambda m: m.update(dtype="float64"), r"dtype is 'float64', not one of"),
    "signed dtype": (lambda m: m.update(dtype="int16"), r"dtype is 'int16'"),
    "dtype too narrow": (
        lambda m: m["tokenizer"].update(vocab_size=70_000),
        r"dtype uint16 cannot hold the ids of a vocabulary of 70000",
    ),
    "missing count": (lambda m: shard0(m).pop("num_tokens"), r"shards\[0\]\.num_tokens is missing"),
    "count as text": (
        lambda m: shard0(m).update(num_tokens="13348"),
        r"shards\[0\]\.num_tokens is '13348', not int",
    ),
    "count as bool": (
        lambda m: shard0(m).update(num_documents=True),
        r"shards\[0\]\.num_documents is True, not int",
    ),
    "negative count": (
        lambda m: m["shards"].append(dict(shard0(m), num_tokens=-5)),
        r"shards\[\d+\] holds -5 tokens",
    ),
    "documents without tokens": (
        lambda m: shard0(m).update(num_tokens=0),
        r"every document holds at least one token",
    ),
    "eos outside vocabulary": (
        lambda m: m["tokenizer"].update(eos_id=257),
        r"tokenizer\.eos_id is 257, not a token of its 257",
    ),
    "vocabulary as text": (
        lambda m: m["tokenizer"].update(vocab_size="x"),
        r"tokenizer\.vocab_size is 'x', not int",
    ),
    "shards not a list": (lambda m: m.update(shards={}), r"shards is \{\}, not list"),
    "shard not an object": (lambda m: m.update(shards=[7]), r"shards\[0\] is int, not an object"),
    "input without spec": (lambda m: m["inputs"][0].pop("spec"), r"inputs\[0\]\.spec is missing"),
    "zero shard size": (
        lambda m: m["inputs"][0].update(shard_chars=0),
        r"inputs\[0\]\.shard_chars is 0",
    ),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_malformed_manifest_names_the_field(prepared_byte, tmp_path, case):
    edit, expected = BAD_MANIFESTS[case]
    d = copy(prepared_byte, tmp_path, lambda _d, m: edit(m))
    with pytest.raises(DataFormatError, match=expected) as err:
        PreparedDataset(d, verify="size")
    assert "prepare the data again" in str(err.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[" * 100_000 + "]" * 100_000, r"not valid JSON \(nested too deeply\)"),
        (b"\xff\xfe{}", r"not valid JSON"),
        ("[1, 2]", r"not a eurotrain prepared-data manifest"),
    ],
)
def test_unparseable_manifest_is_a_data_error(prepared_byte, tmp_path, text, expected):
    d = copy(prepared_byte, tmp_path, lambda _d, m: None)
    f = d / "manifest.json"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DataFormatError, match=expected):
        PreparedDataset(d)


def test_shard_that_is_a_fifo_is_refused_without_reading_it(prepared_byte, tmp_path):
    def fifo(d: Path, m: dict[str, Any]) -> None:
        os.unlink(d / shard0(m)["file"])
        os.mkfifo(d / shard0(m)["file"])

    d = copy(prepared_byte, tmp_path, fifo)
    for verify in ("size", "checksum"):  # opening a FIFO for its checksum would block forever
        with pytest.raises(DataFormatError, match=r"shard-00000\.bin is not a regular file"):
            PreparedDataset(d, verify=verify)


def test_shards_may_be_links_to_regular_files(prepared_byte, tmp_path):
    """Shards kept in a shared folder and linked into the prepared directory still open."""
    shared = tmp_path / "shared"
    shared.mkdir()

    def link(d: Path, m: dict[str, Any]) -> None:
        f = d / shard0(m)["file"]
        f.rename(shared / f.name)
        f.symlink_to(shared / f.name)

    d = copy(prepared_byte, tmp_path, link)
    assert PreparedDataset(d).num_tokens == PreparedDataset(prepared_byte).num_tokens


def forge_token(d: Path, m: dict[str, Any], offset: int = 100, token: int = 60_000) -> None:
    """Put an id outside the byte tokenizer's 257 into the second shard (uint16 holds it)."""
    f = d / m["shards"][1]["file"]
    a = np.fromfile(f, dtype="<u2")
    a[offset] = token
    a.tofile(f)


def test_token_outside_the_vocabulary_is_found_by_the_checksum_pass(prepared_byte, tmp_path):
    d = copy(prepared_byte, tmp_path, forge_token)
    with pytest.raises(
        TokenRangeError, match=r"shard-00001\.bin holds token id 60000 at token 100, outside"
    ) as err:
        PreparedDataset(d, verify="checksum")
    assert "ids 0..256" in str(err.value)
    with pytest.raises(TokenRangeError):  # and by `eurotrain data verify`, with exit code 2
        PreparedDataset(d)
    assert data_main(["verify", str(d)]) == 2


def test_token_outside_the_vocabulary_stops_the_batch_that_holds_it(prepared_byte, tmp_path):
    """With ``verify: size`` nothing reads the tokens at start-up: the loader checks each batch on
    the host, so the id never reaches an embedding (on a GPU: a device-side assert)."""
    d = copy(prepared_byte, tmp_path, forge_token)
    cfg = DataConfig(sources=[SourceConfig(path=str(d))], seq_len=32, verify="size")
    data = DataPipeline(cfg)
    loader = data.train_loader(global_batch=8, micro_batch=4, dp_rank=0, dp_size=1, seed=0)
    served = 0
    with pytest.raises(
        TokenRangeError, match=r"holds token id 60000 at position \d+ of its sequence"
    ):
        for _ in range(len(loader.sources[0]) // 8 + 1):  # one epoch reaches every row
            batch = next(loader)
            assert max(int(t.max()) for t in batch.inputs + batch.labels) < 257
            served += 1
    assert served < len(loader.sources[0]) // 8 + 1
    assert TokenRangeError.every_rank is False  # only the rank that read it knows: it reports


def damage_index(d: Path, m: dict[str, Any]) -> None:
    f = d / shard0(m)["index_file"]
    ends = np.fromfile(f, dtype="<i8")
    ends[3], ends[4] = ends[4], ends[3]  # two documents out of order: same bytes, other sum
    ends.tofile(f)


def test_damaged_document_index_is_refused_before_any_model(prepared_byte, tmp_path):
    d = copy(prepared_byte, tmp_path, damage_index)
    cfg = DataConfig(sources=[SourceConfig(path=str(d))], seq_len=32, document_positions=True)
    with pytest.raises(
        ConfigError, match=r"shard-00000\.idx does not index its shard .*document 4"
    ):
        DataPipeline(cfg)
    assert data_main(["verify", str(d)]) == 2
    DataPipeline(DataConfig(sources=[SourceConfig(path=str(d))], seq_len=32))  # index not needed


@pytest.mark.parametrize(
    "ends, expected",
    [
        ([3, 5, 9], None),
        ([9], None),
        ([0, 5, 9], "document 0 ends at 0, at the start"),
        ([3, 3, 9], "document 1 ends at 3, after 3"),
        ([3, 10**12, 9], "document 1 ends at 1,000,000,000,000, beyond the shard"),
        ([3, 5, -1], "document 2 ends at -1, after 5"),
        ([3, 5, 8], "the last document ends at 8, not 9"),
        ([], "the last document ends at 0, not 9"),
    ],
)
def test_index_problem(ends, expected):
    assert index_problem(np.array(ends, dtype=np.int64), 9) == expected


EVIL = """import pathlib
pathlib.Path(__file__).with_name("RAN").write_text("code from the tokenizer directory ran")
from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


@pytest.mark.parametrize("config_file", ["tokenizer_config.json", "config.json"])
def test_tokenizer_with_its_own_code_is_refused_before_transformers_sees_it(
    bpe_dir, tmp_path, config_file
):
    """transformers would ask on a terminal whether to run the directory's code; eurotrain
    refuses the directory without asking, and the code never runs."""
    d = tmp_path / "tok"
    shutil.copytree(bpe_dir, d)
    (d / "evil.py").write_text(EVIL)
    f = d / config_file
    config = json.loads(f.read_text()) if f.exists() else {}
    config.update(auto_map={"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]})
    if config_file == "tokenizer_config.json":
        config["tokenizer_class"] = "EvilTokenizer"
    f.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=rf"{config_file} names custom Python code \(auto_map\)"):
        load_tokenizer(str(d))
    assert not (d / "RAN").exists()


def test_tokenizer_with_ids_beyond_its_length_counts_its_largest_id(bpe_dir, tmp_path):
    """A vocabulary with a gap (an id far beyond the number of entries): the vocabulary size,
    and so the model's embedding and the shards' dtype, must hold the largest id."""
    d = tmp_path / "tok"
    shutil.copytree(bpe_dir, d)
    t = json.loads((d / "tokenizer.json").read_text())
    vocab = t["model"]["vocab"]
    token = next(k for k, v in vocab.items() if v == max(vocab.values()))
    vocab[token] = 70_000  # beyond uint16 too
    (d / "tokenizer.json").write_text(json.dumps(t))
    tok = load_tokenizer(str(d))
    assert len(tok.tok) < 1000 and tok.vocab_size == 70_001
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text(token.replace("Ġ", " ") * 50)
    prepare(str(text), str(d), str(tmp_path / "out"), workers=1)
    ds = PreparedDataset(tmp_path / "out")  # checksum pass: every id inside the vocabulary
    assert ds.dtype == np.uint32 and ds.tokenizer["vocab_size"] == 70_001
    assert int(np.max(ds.read_rows(np.array([0]), ds.num_tokens))) == 70_000


# ---- the checksum pass is split over the ranks, and they agree on its verdict ----------------


def test_each_rank_checks_its_share_of_the_shards(prepared_byte):
    ds = PreparedDataset(prepared_byte, verify="size")
    shares = [ds.verify_share(rank, 3) for rank in range(3)]
    assert ds.num_shards >= 3 and all(shares)
    assert sorted(f for share in shares for f in share) == sorted(s["file"] for s in ds._shards)
    assert ds.verify_share(0, 2, offset=1) == ds.verify_share(1, 2)  # offsets across sources


def _open_on_ranks(rank: int, world: int, path: str) -> str:
    cfg = DataConfig(sources=[SourceConfig(path=path)], seq_len=32)
    try:
        DataPipeline(cfg, rank, world)
    except ConfigError as e:
        return str(e)
    return "ok"


def test_a_problem_in_one_ranks_share_stops_every_rank(prepared_byte, tmp_path):
    """Shard 1 is rank 1's to read: rank 0 never reads it, and still stops with rank 1's
    error (the same on every rank, so rank 0 reports it and no rank trains on)."""
    from multiproc import run_distributed

    assert run_distributed(_open_on_ranks, 2, str(prepared_byte), timeout=120) == ["ok", "ok"]
    d = copy(prepared_byte, tmp_path, forge_token)
    first, second = run_distributed(_open_on_ranks, 2, str(d), timeout=120)
    assert first == second
    assert "data.sources: " in first and "shard-00001.bin holds token id 60000" in first
