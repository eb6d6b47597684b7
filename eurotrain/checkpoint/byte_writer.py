"""Writing a checkpoint's data file from staged host memory, hashed while it is written.

A file is a list of segments: small byte strings (torch.save's zip headers and pickles) and
references ``(buffer id, offset, length)`` into staging buffers (the tensors' bytes). Other
threads hash the bytes from memory while they are written (SHA-256 of 32 MiB pieces, several
pieces at once: PIECE_DIGEST); an fsync ends the file. The digest is of exactly the bytes
written, so no second read of the file is needed for the commit marker.

Through the page cache (the default): each chunk is written and its write-back started at once
(sync_file_range). Direct I/O (``checkpoint.direct_io``): the bytes are copied into page-aligned
bounce buffers, filled in turn while DIRECT_DEPTH others are written with O_DIRECT, so the
device reads them from there and the kernel's page cache holds none of them. Where the file
system refuses O_DIRECT (EINVAL), the file is written again through the page cache, and the
reply says so. Which is faster depends on the file system and the size (docs/checkpointing.md).

This module imports nothing but the standard library: besides running inside the training
process (``checkpoint.writer: thread``) it is the checkpoint writer process of each rank
(``checkpoint.writer: process``, the default), which maps the staging buffers (memfd file
descriptors passed over a socket) and so keeps the bytes, the hashing and the system calls off
the training process's GIL. It is started with ``serve_fd`` as its entry point and ends when its
socket closes (the training process ended, however it ended).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import mmap
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2}
"""What the writer ignores: the signals that ask the trainer to stop (with a final save)."""

FILE_MODE = 0o640
"""Checkpoint files: readable by the project group, writable by the owner only."""
CHUNK = 32 << 20
"""Bytes written, handed to the disk and hashed at a time."""
NICENESS = 10
"""The writer process runs at this lower CPU priority: where the node's cores are all busy
(data loading, the training process's own threads), the scheduler gives them to training
first, and the write, which waits on the disk most of the time, takes what is left."""
DIRECT_ALIGN = max(4096, mmap.PAGESIZE)
"""O_DIRECT: file offsets, lengths and memory addresses are multiples of this (the logical block
size of any disk; Lustre asks for the page size, 64 KiB on some Arm kernels)."""
DIRECT = hasattr(os, "O_DIRECT")
"""Whether this platform has O_DIRECT at all (Linux does)."""
_SYNC_FILE_RANGE_WRITE = 2

Segment = bytes | tuple[int, int, int]
"""Bytes to write as they are, or (buffer id, offset, length) into a staging buffer."""


def _sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    fn = getattr(ctypes.CDLL(name, use_errno=True), "sync_file_range", None) if name else None
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_START_WRITEBACK = _sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this range to the disk now, without waiting: the final
    fsync then finds most of the file written. A hint: a failure (e.g. a file system without
    it) changes nothing but speed."""
    if _START_WRITEBACK is not None:
        _START_WRITEBACK(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def _views(segments: list[Segment], buffers: dict[int, memoryview]) -> list[memoryview]:
    """The segments as memory views, cut into chunks of at most CHUNK bytes."""
    views = []
    for segment in segments:
        if isinstance(segment, bytes):
            view = memoryview(segment)
        else:
            buffer_id, offset, length = segment
            view = buffers[buffer_id][offset : offset + length]
        views += [view[at : at + CHUNK] for at in range(0, len(view), CHUNK)]
    return views


PIECE = 32 << 20
"""The checksum's piece size: each PIECE bytes of a file (by offset) are hashed on their own."""
PIECE_DIGEST = "sha256-pieces-32MiB"
"""Name of the checksum, as commit markers record it: SHA-256 of the concatenated SHA-256
digests (32 bytes each) of the file's consecutive PIECE-byte pieces, the last one shorter (an
empty file: of no digests). The pieces are independent, so several cores hash one file: one
core's SHA-256 (~1.5-1.8 GB/s) no longer caps what a rank writes or verifies."""


def hash_threads() -> int:
    """Threads that hash one file at once: the cores this process may run on, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def pieces(views: list[memoryview]) -> list[list[memoryview]]:
    """The bytes of ``views`` (in order) regrouped into PIECE-byte pieces, by offset."""
    out: list[list[memoryview]] = []
    current: list[memoryview] = []
    fill = 0
    for view in views:
        at = 0
        while at < len(view):
            n = min(PIECE - fill, len(view) - at)
            current.append(view[at : at + n])
            fill, at = fill + n, at + n
            if fill == PIECE:
                out.append(current)
                current, fill = [], 0
    if current:
        out.append(current)
    return out


def combine(piece_digests: list[bytes]) -> str:
    """The file's checksum (PIECE_DIGEST) from its pieces' SHA-256 digests, in order."""
    return hashlib.sha256(b"".join(piece_digests)).hexdigest()


def digest_pieces(count: int, piece_digest: Callable[[int], bytes], threads: int = 0) -> str:
    """PIECE_DIGEST of a file of ``count`` pieces, ``piece_digest(i)`` being the SHA-256 digest
    of piece i; ``threads`` threads (hash_threads() when 0) take every threads-th piece. hashlib
    (and a read) releases the GIL, so they run on as many cores."""
    digests: list[bytes] = [b""] * count
    failed: list[Exception] = []

    def work(first: int, step: int) -> None:
        try:
            for index in range(first, count, step):
                digests[index] = piece_digest(index)
        except Exception as e:  # raised in the caller below
            failed.append(e)

    step = max(1, min(threads or hash_threads(), count))
    helpers = [
        threading.Thread(target=work, args=(k, step), name=f"eurotrain-ckpt-hash-{k}")
        for k in range(1, step)
    ]
    for helper in helpers:
        helper.start()
    work(0, step)
    for helper in helpers:
        helper.join()
    if failed:
        raise failed[0]
    return combine(digests)


def hash_pieces(views: list[memoryview], threads: int = 0) -> str:
    """PIECE_DIGEST of the bytes of ``views``, hashed from memory beside the writes."""
    parts = pieces(views)

    def piece_digest(index: int) -> bytes:
        digest = hashlib.sha256()
        for view in parts[index]:
            digest.update(view)
        return digest.digest()

    return digest_pieces(len(parts), piece_digest, threads)


def _hash(views: list[memoryview], out: list[str | Exception]) -> None:
    try:
        out.append(hash_pieces(views))
    except Exception as e:  # raised by write_file
        out.append(e)


DIRECT_DEPTH = 2
"""O_DIRECT writes in flight at once (each from its own thread); one more bounce buffer than
this is filled meanwhile."""
_bounce: list[memoryview] = []
"""The O_DIRECT bounce buffers, allocated at the first direct write and kept."""


def _bounce_buffers() -> list[memoryview]:
    if len(_bounce) != DIRECT_DEPTH + 1 or len(_bounce[0]) != CHUNK:
        _bounce[:] = [memoryview(mmap.mmap(-1, CHUNK)) for _ in range(DIRECT_DEPTH + 1)]
    return _bounce  # page-aligned: mmap's


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _write_buffered(path: str, views: list[memoryview]) -> int:
    size = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        for chunk in views:
            _write_all(fd, chunk)
            start_writeback(fd, size, len(chunk))  # the disk starts on it at once
            size += len(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


def _write_direct(path: str, views: list[memoryview]) -> int:
    """The views through the bounce buffers with O_DIRECT: this thread fills them in turn while
    DIRECT_DEPTH threads write the full ones, each at its offset. The last one is padded with
    zeros to DIRECT_ALIGN and the file then cut to its size. Raises OSError(EINVAL) where the
    file system refuses O_DIRECT."""
    bounce = _bounce_buffers()
    free: queue.Queue[int] = queue.Queue()
    full: queue.Queue[tuple[int, int, int] | None] = queue.Queue()
    for index in range(len(bounce)):
        free.put(index)
    failed: list[OSError] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, FILE_MODE)

    def drain() -> None:
        while (item := full.get()) is not None:
            index, offset, length = item
            if not failed:
                padded = -(-length // DIRECT_ALIGN) * DIRECT_ALIGN
                bounce[index][length:padded] = bytes(padded - length)
                try:
                    _pwrite_all(fd, bounce[index][:padded], offset)
                except OSError as e:
                    failed.append(e)
            free.put(index)

    writers = [
        threading.Thread(target=drain, name=f"eurotrain-ckpt-direct-{i}")
        for i in range(DIRECT_DEPTH)
    ]
    for writer in writers:
        writer.start()
    size = 0
    try:
        index, fill = free.get(), 0
        for view in views:
            at = 0
            while at < len(view) and not failed:
                n = min(CHUNK - fill, len(view) - at)
                bounce[index][fill : fill + n] = view[at : at + n]
                fill, at = fill + n, at + n
                if fill == CHUNK:
                    full.put((index, size, fill))
                    size += fill
                    index, fill = free.get(), 0
        if fill and not failed:
            full.put((index, size, fill))
            size += fill
    finally:
        for _ in writers:
            full.put(None)
        for writer in writers:
            writer.join()
        try:
            if not failed:
                os.ftruncate(fd, size)  # the zeros after the last byte
                os.fsync(fd)
        finally:
            os.close(fd)
    if failed:
        raise failed[0]
    return size


def write_file(
    path: str, segments: list[Segment], buffers: dict[int, memoryview], *, direct: bool = False
) -> tuple[int, str, str]:
    """Write the segments to a new file at ``path`` (mode 0640, fsynced); (size, checksum, how
    it was written: "direct", "page cache", or "page cache (O_DIRECT refused: ...)").

    The bytes are hashed from memory while they are written, by hash_threads() threads
    (PIECE_DIGEST): the checksum then costs no time beside the disk, and it is of exactly the
    bytes written."""
    views = _views(segments, buffers)
    digest: list[str | Exception] = []
    hasher = threading.Thread(target=_hash, args=(views, digest), name="eurotrain-ckpt-hash")
    hasher.start()
    how = "page cache"
    try:
        if direct and DIRECT:
            try:
                size = _write_direct(path, views)
                how = "direct"
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                how = f"page cache (O_DIRECT refused: {e.strerror or e})"
                size = _write_buffered(path, views)
        else:
            size = _write_buffered(path, views)
    finally:
        hasher.join()
    os.chmod(path, FILE_MODE)  # the mode given to open() is filtered by the umask
    if isinstance(digest[0], Exception):
        raise digest[0]
    return size, digest[0], how


def serve(conn: Connection) -> None:
    """The writer process's loop: messages from the training process, one at a time.

    ("buffer", id, size) + a file descriptor    map a staging buffer
    ("forget", id)                              unmap it
    ("write", path, segments, direct)           -> ("ok", size, checksum, how) or
                                                   ("error", errno, text)
    """
    maps: dict[int, tuple[mmap.mmap, memoryview]] = {}
    views: dict[int, memoryview] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        kind = message[0]
        if kind == "buffer":
            _, buffer_id, size = message
            fd = reduction.recv_handle(conn)
            mapped = mmap.mmap(fd, size, prot=mmap.PROT_READ)
            os.close(fd)
            maps[buffer_id] = (mapped, memoryview(mapped))
            views[buffer_id] = maps[buffer_id][1]
        elif kind == "forget":
            views.pop(message[1], None)
            view_map = maps.pop(message[1], None)
            if view_map is not None:
                view_map[1].release()
                view_map[0].close()
        elif kind == "write":
            _, path, segments, direct = message
            try:
                size, digest, how = write_file(path, segments, views, direct=direct)
                conn.send(("ok", size, digest, how))
            except OSError as e:
                conn.send(("error", e.errno or 0, f"{e.strerror or e}: {path}"))
            except Exception as e:  # a bug: report it rather than leave the trainer waiting
                conn.send(("error", 0, f"{type(e).__name__}: {e}"))


def serve_fd(fd: int) -> None:
    """Entry point of the writer process: serve the socket ``fd``. Signals meant for the
    training ranks (SLURM's USR1 warning, a Ctrl-C, a TERM to the process group) leave it
    running, so that the final checkpoint they ask for can still be written; it ends when the
    training process closes the socket or dies."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the parent at start
    with contextlib.suppress(OSError):  # where not allowed: at the trainer's priority
        os.nice(NICENESS)
    serve(Connection(fd))


if __name__ == "__main__":
    serve_fd(int(sys.argv[1]))
