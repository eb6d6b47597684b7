"""The data-file writer: the same bytes and checksum with O_DIRECT and through the page cache,
the page cache where O_DIRECT is refused, and which saves take which way; the checksum over
pieces, the same from memory and from disk with any number of threads."""

from __future__ import annotations

import hashlib
import mmap
import os

import pytest
import torch
from crafted import piece_sha256

from eurotrain.checkpoint import CheckpointConfig, byte_writer
from eurotrain.checkpoint.checkpointer import Checkpointer
from eurotrain.checkpoint.directory import MARKER
from eurotrain.checkpoint.verify import verify_checkpoint
from eurotrain.configtools import ConfigError
from eurotrain.parallel.engine import ModelState, OptimizerState
from eurotrain.state import TrainState

LAYOUTS = {
    "headers and two tensors": [
        b"PK" * 40,
        (1, 64, 3 << 20),
        b"x" * 100,
        (1, 128, 1_234_567),
        b"z",
    ],
    "one byte": [b"a"],
    "exactly two chunks": [(1, 0, 2 << 20)],
    "empty": [],
}


@pytest.fixture
def staged(monkeypatch):
    monkeypatch.setattr(byte_writer, "CHUNK", 1 << 20)  # several chunks, both bounce buffers
    monkeypatch.setattr(byte_writer, "PIECE", 1_000_003)  # pieces cut inside segments
    buffer = mmap.mmap(-1, 5 << 20)
    buffer[:] = os.urandom(5 << 20)
    view = memoryview(buffer)
    yield view
    view.release()


def _expected(segments, view) -> bytes:
    return b"".join(
        s if isinstance(s, bytes) else bytes(view[s[1] : s[1] + s[2]]) for s in segments
    )


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "page-cache"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_both_ways_write_the_same_bytes_and_checksum(tmp_path, staged, layout, direct):
    segments = LAYOUTS[layout]
    path = tmp_path / "data.distcp"
    size, digest, how = byte_writer.write_file(str(path), segments, {1: staged}, direct=direct)
    want = _expected(segments, staged)
    assert path.read_bytes() == want and size == len(want)
    assert digest == piece_sha256(want, byte_writer.PIECE)
    assert path.stat().st_mode & 0o777 == byte_writer.FILE_MODE
    if direct:
        assert how == "direct" or how.startswith("page cache (O_DIRECT refused")
    else:
        assert how == "page cache"


def _enforces_alignment(directory) -> bool:
    """Whether this file system refuses an O_DIRECT write of an unaligned length (tmpfs on the
    development VM's Linux 6.18 takes any; its ext4 refuses)."""
    path = directory / "probe"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return True  # O_DIRECT refused outright: the same fallback
    buffer = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        os.write(fd, memoryview(buffer)[:100])
    except OSError:
        return True
    finally:
        os.close(fd)
        path.unlink()
    return False


def test_refused_o_direct_writes_through_the_page_cache(tmp_path, staged, monkeypatch):
    """An alignment the device refuses (EINVAL, as from a file system without O_DIRECT): the
    file is written again through the page cache, whole, and the reply says why."""
    if not _enforces_alignment(tmp_path):
        pytest.skip(f"{tmp_path}'s file system takes unaligned O_DIRECT writes: nothing refuses")
    monkeypatch.setattr(byte_writer, "DIRECT_ALIGN", 1)  # lengths no longer block multiples
    segments = LAYOUTS["headers and two tensors"]
    path = tmp_path / "data.distcp"
    _, digest, how = byte_writer.write_file(str(path), segments, {1: staged}, direct=True)
    want = _expected(segments, staged)
    assert how.startswith("page cache (O_DIRECT refused: ") and "Invalid argument" in how
    assert path.read_bytes() == want and digest == piece_sha256(want, byte_writer.PIECE)


WAYS = {  # checkpoint.direct_io: how (sync save, async save) are written
    "never": ("page cache", "page cache"),
    "sync": ("direct", "page cache"),
    "always": ("direct", "direct"),
}


@pytest.mark.parametrize("writer", ["process", "thread"])
@pytest.mark.parametrize("direct_io", list(WAYS))
def test_each_save_is_written_the_way_direct_io_asks(tmp_path, writer, direct_io):
    """Sync and async saves, each written as checkpoint.direct_io asks (the commit's log line
    says how), and both verify."""
    cfg = CheckpointConfig(
        dir=str(tmp_path), interval=1, keep_last=0, writer=writer, direct_io=direct_io
    )
    logs: list[str] = []
    ck = Checkpointer(cfg, tmp_path, 0, 1, log=logs.append)
    model = torch.nn.Linear(300, 300)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 300)).sum().backward()
    opt.step()
    parts = {"model": ModelState(model), "optim": OptimizerState(model, opt), "train": TrainState()}
    info = {"tokens_seen": 0, "layout": {}, "config_yaml": "x: 1\n"}
    try:
        ck.save(1, parts, info, sync=True)
        ck.save(2, parts, info, sync=False)
        ck.wait()
    finally:
        ck.close()
    committed = [line for line in logs if "committed" in line]
    assert len(committed) == 2, logs
    for line, how in zip(committed, WAYS[direct_io], strict=True):
        refused = how == "direct" and "io: page cache (O_DIRECT refused" in line
        assert line.endswith(f"io: {how})") or refused, line
    for step in (1, 2):
        path = tmp_path / f"step-{step:06d}"
        assert (path / MARKER).exists()
        verify_checkpoint(path, "full")


def test_the_page_cache_is_the_default():
    assert CheckpointConfig().direct_io == "never"


def test_direct_io_is_checked():
    with pytest.raises(ConfigError, match=r"checkpoint\.direct_io: 'yes' must be one of never"):
        CheckpointConfig(direct_io="yes")  # type: ignore[arg-type]


SIZES = [0, 1, 1000, 4096, 4097, 3 * 4096 - 1, 3 * 4096, 5 * 4096 + 7]


@pytest.mark.parametrize("size", SIZES)
def test_the_checksum_over_pieces_is_the_same_however_it_is_computed(tmp_path, monkeypatch, size):
    """From memory cut at any boundaries, from disk, with 1 to 4 threads, through storage.digest:
    always SHA-256 of the pieces' SHA-256 digests, pieces by file offset."""
    from eurotrain.checkpoint import storage

    monkeypatch.setattr(byte_writer, "PIECE", 4096)
    monkeypatch.setattr(storage, "_READ", 1000)  # a piece read from disk in several parts
    data = os.urandom(size)
    want = piece_sha256(data, 4096)
    cuts = [memoryview(data)[at : at + 333] for at in range(0, size, 333)]  # never on a piece
    cuts.insert(len(cuts) // 2, memoryview(b""))
    path = tmp_path / "file"
    path.write_bytes(data)
    for threads in (1, 2, 3, 4):
        assert byte_writer.hash_pieces(cuts, threads) == want
        assert storage.checksum(path, threads=threads) == want
    assert storage.digest(data) == want == storage.checksum(path)
    assert storage.checksum(path, "sha256") == hashlib.sha256(data).hexdigest()  # older markers


def test_a_file_cut_short_while_hashed_gives_another_checksum(tmp_path, monkeypatch):
    """Truncated after its size was read (e.g. overwritten during a verify): no hang, no error
    but a checksum that differs, which verify reports as corruption."""
    from eurotrain.checkpoint import storage

    monkeypatch.setattr(byte_writer, "PIECE", 4096)
    data = os.urandom(3 * 4096)
    path = tmp_path / "file"
    path.write_bytes(data)
    os.truncate(path, 2 * 4096 + 5)

    class SizeBefore:
        st_size = len(data)

    monkeypatch.setattr(type(path), "stat", lambda self, **kw: SizeBefore())
    for threads in (1, 3):
        assert storage.checksum(path, threads=threads) != piece_sha256(data, 4096)
