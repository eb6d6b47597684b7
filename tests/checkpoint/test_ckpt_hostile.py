"""A received checkpoint is written by an attacker, beyond code execution (test_ckpt_untrusted.py):
files that would crash the process, hang it, make it read outside the checkpoint, or load part of
a tensor without an error. Each is refused with a CheckpointError, marker re-signed throughout."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import signal
import zipfile
from pathlib import Path

import pytest
import torch
from ckpt_common import tiny_config
from crafted import replace_value, resign, silent, torch_saved
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata

from eurotrain.checkpoint import CheckpointError
from eurotrain.checkpoint.convert import read_model_weights
from eurotrain.checkpoint.directory import read_marker
from eurotrain.checkpoint.safe_pickle import Refused, nesting
from eurotrain.checkpoint.verify import verify_checkpoint
from eurotrain.train import Trainer

DEEP = 1_000_000
"""Tuples nested this deep overflow the C stack when hashed (a crash, not an exception)."""


def deep_tuple() -> bytes:
    return pickle.EMPTY_TUPLE + pickle.TUPLE1 * DEEP


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("saved")
    Trainer(tiny_config(out, "run", 2, checkpoint={"interval": 2})).train()
    return out / "run" / "checkpoints" / "step-000002"


def copy_of(saved: Path, tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpts" / "step-000002"
    shutil.copytree(saved, ckpt)
    return ckpt


def with_metadata(saved: Path, tmp_path: Path, data: bytes) -> Path:
    ckpt = copy_of(saved, tmp_path)
    (ckpt / ".metadata").write_bytes(data)
    resign(ckpt)
    return ckpt


@pytest.mark.parametrize(
    "payload, named",
    [
        # a dict whose key is a tuple a million deep
        (pickle.EMPTY_DICT + deep_tuple() + pickle.NONE + pickle.SETITEM, "tuple as a dict key"),
        (pickle.MARK + deep_tuple() + pickle.NONE + pickle.DICT, "tuple as a dict key"),
        # the same tuple called (REDUCE looks its callable up)
        (deep_tuple() + pickle.EMPTY_TUPLE + pickle.REDUCE, "calls builtins.tuple"),
        (pickle.EMPTY_SET + pickle.MARK + deep_tuple() + pickle.ADDITEMS, "EMPTY_SET"),
    ],
    ids=["setitem", "dict", "reduce", "set"],
)
def test_metadata_hashing_a_deep_tuple_is_refused_not_a_crash(saved, tmp_path, payload, named):
    real = (saved / ".metadata").read_bytes()
    ckpt = with_metadata(saved, tmp_path, silent(payload, real))
    with pytest.raises(CheckpointError, match=named):
        verify_checkpoint(ckpt, "metadata")


def value_zip(data_pkl: bytes) -> bytes:
    """A torch.save zip whose data.pkl is ``data_pkl`` (the other records as torch wrote them)."""
    src = zipfile.ZipFile(io.BytesIO(torch_saved({"a": 1})))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            is_pkl = info.filename.endswith("/data.pkl")
            dst.writestr(info.filename, data_pkl if is_pkl else src.read(info))
    return out.getvalue()


def resume_with_value(saved: Path, tmp_path: Path, blob: bytes) -> None:
    ckpt = copy_of(saved, tmp_path)
    replace_value(ckpt, "train", blob)
    resign(ckpt)
    Trainer(tiny_config(tmp_path, "run", 3, checkpoint={"resume": str(ckpt)})).resume()


def test_value_with_a_deep_tuple_key_is_refused_not_a_crash(saved, tmp_path):
    """torch.load(weights_only=True) hashes dict keys; its pickle is measured first."""
    crafted = pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + deep_tuple()
    crafted += pickle.NONE + pickle.SETITEM + pickle.STOP
    with pytest.raises(CheckpointError, match=r"value 'train' .*nests objects more than 100"):
        resume_with_value(saved, tmp_path, value_zip(crafted))


def test_value_that_is_not_a_zip_is_refused(saved, tmp_path):
    with pytest.raises(CheckpointError, match=r"value 'train' .*not a torch.save zip"):
        resume_with_value(saved, tmp_path, pickle.dumps({"step": 2}))


def test_value_sharing_one_list_at_every_level_is_refused_quickly(saved, tmp_path):
    """8 levels of 8 references to the same list: 200 bytes, 16.7 million items walked."""
    value: object = [0] * 8
    for _ in range(7):
        value = [value] * 8
    with pytest.raises(CheckpointError, match=r"value 'train' is a list"):
        resume_with_value(saved, tmp_path, torch_saved(value))


def test_nesting_of_pickles_eurotrain_writes():
    assert nesting(pickle.dumps({"lr": 1e-3, "betas": (0.9, 0.95), "params": ["w"] * 5000})) <= 3
    shared = [1, 2]
    assert nesting(pickle.dumps([shared, shared, (shared,)])) <= 4
    for garbage in (b"", b"\x80\x04", b"((((", b"\xf1"):
        with pytest.raises(Refused, match="well-formed"):
            nesting(garbage)


def first_tensor(meta) -> tuple[str, TensorStorageMetadata]:
    return next(
        (k, v)
        for k, v in meta.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata) and len(v.size) == 2 and v.size[0] >= 2
    )


def chunk(offsets, sizes) -> ChunkStorageMetadata:
    return ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))


@pytest.mark.parametrize("how", ["none", "half", "twice-the-same-half", "outside"])
def test_chunks_that_do_not_tile_the_tensor_are_refused(saved, tmp_path, how):
    """Left alone, a tensor whose chunks leave a gap loads partly: the rest keeps what the
    target held (convert used to export uninitialised memory there)."""
    meta = pickle.loads((saved / ".metadata").read_bytes())  # our own file: trusted here
    key, entry = first_tensor(meta)
    rows, cols = entry.size
    entry.chunks = {
        "none": [],
        "half": [chunk((0, 0), (rows // 2, cols))],
        "twice-the-same-half": [chunk((0, 0), (rows // 2, cols))] * 2 + [chunk((0, 0), (1, 0))],
        "outside": [chunk((1, 0), (rows, cols))],
    }[how]
    if how == "twice-the-same-half" and rows % 2:
        entry.chunks.append(chunk((rows - 1, 0), (1, cols)))
    ckpt = with_metadata(saved, tmp_path, pickle.dumps(meta, protocol=4))
    with pytest.raises(CheckpointError, match=rf"tensor entry '{key}' has a malformed"):
        read_model_weights(ckpt)


def test_chunks_claiming_more_than_the_files_hold_are_refused(saved, tmp_path):
    meta = pickle.loads((saved / ".metadata").read_bytes())  # our own file: trusted here
    key, entry = first_tensor(meta)
    entry.size = torch.Size((1 << 20, 1 << 20))  # 4 TiB of fp32
    entry.chunks = [chunk((0, 0), entry.size)]
    ckpt = with_metadata(saved, tmp_path, pickle.dumps(meta, protocol=4))
    with pytest.raises(CheckpointError, match=rf"'{key}' has a chunk larger than its stored"):
        read_model_weights(ckpt)


def data_file(ckpt: Path) -> Path:
    return next(ckpt.glob("*.distcp"))


@pytest.mark.parametrize("verify", ["metadata", "none"])
def test_a_data_file_that_is_a_link_out_of_the_checkpoint_is_refused(saved, tmp_path, verify):
    """Signed with the size (metadata) of the file it points to, a link would load that file
    (a key, say) into the model, which is then published."""
    ckpt = copy_of(saved, tmp_path)
    shard = data_file(ckpt)
    outside = tmp_path / "secret"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    _, metadata = verify_checkpoint(ckpt, "none")
    with pytest.raises(CheckpointError, match=rf"{shard.name}: a symbolic link"):
        if verify == "none":
            read_model_weights(ckpt, metadata)
        else:
            verify_checkpoint(ckpt, verify)


def test_a_data_file_that_is_a_fifo_is_refused_not_a_hang(saved, tmp_path):
    ckpt = copy_of(saved, tmp_path)
    shard = data_file(ckpt)
    shard.unlink()
    os.mkfifo(shard)
    _, metadata = verify_checkpoint(ckpt, "none")

    def hung(*_: object) -> None:
        raise TimeoutError("the read of a FIFO never ended")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        with pytest.raises(CheckpointError, match=rf"{shard.name}: not a regular file"):
            read_model_weights(ckpt, metadata)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", ["COMMITTED.json", ".metadata"])
def test_a_link_or_a_deeply_nested_marker_is_a_checkpoint_error(saved, tmp_path, name):
    ckpt = copy_of(saved, tmp_path)
    target = ckpt / name
    shutil.move(target, tmp_path / "moved")
    target.symlink_to(tmp_path / "moved")
    with pytest.raises(CheckpointError, match="a symbolic link"):
        verify_checkpoint(ckpt, "metadata")
    target.unlink()
    if name == "COMMITTED.json":
        target.write_text("[" * 100_000 + "]" * 100_000)  # deeper than Python's JSON parses
        with pytest.raises(CheckpointError, match="not a eurotrain-checkpoint/1 commit marker"):
            read_marker(ckpt)
