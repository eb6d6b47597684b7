"""DCP's file format, written from staged host memory by the rank's writer, checksummed as written.

``HashingWriter`` is a ``FileSystemWriter`` whose ``write_data`` lays out this rank's one data
file exactly as DCP's would (each item through ``torch.save``, byte items as they are, offsets
and lengths in the metadata), but records the bytes instead of writing them: torch.save hands
the tensor's storage to the stream as a view of the staging buffer, which becomes a reference
(buffer, offset, length); only the small zip headers and pickles are copied. The recorded
segments go to a ``Sink``: the writer process (``ProcessSink``) or this process (``ThreadSink``,
where no memfd exists). Either returns the file's size and SHA-256, computed while writing.

``.metadata`` stays DCP's (written by ``finish``); any reader of DCP checkpoints reads these.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import io
import os
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing import reduction
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from eurotrain.checkpoint import byte_writer
from eurotrain.checkpoint.staging import HostBuffer
from eurotrain.checkpoint.storage import DIGEST

KILL_HOOK = "EUROTRAIN_TEST_CKPT_KILL"
"""Test hook "RANK:STEP": that rank truncates its shard to half and SIGKILLs itself mid-save."""
ENOSPC_HOOK = "EUROTRAIN_TEST_CKPT_ENOSPC"
"""Test hook "STEP": every rank's write of that step fails with ENOSPC (where no small tmpfs
can be mounted to fill up for real)."""
_INLINE = 1 << 16
"""Writes shorter than this are copied (headers, pickles); longer ones inside a staging buffer
are referenced."""


class Recorder(io.RawIOBase):
    """A write-only stream that records what torch.save writes, as segments."""

    def __init__(self, buffers: list[HostBuffer]) -> None:
        super().__init__()
        self.segments: list[byte_writer.Segment] = []
        self.pos = 0
        self._pending = bytearray()
        self._ranges = [(b.base.data_ptr(), b) for b in buffers]

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def _where(self, view: memoryview) -> tuple[int, int] | None:
        if view.nbytes < _INLINE:
            return None
        address = np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0]
        for base, buffer in self._ranges:
            if base <= address and address + view.nbytes <= base + buffer.size:
                return buffer.id, address - base
        return None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        where = self._where(view)
        if where is None:
            self._pending += view
        else:
            self._flush_pending()
            self.segments.append((where[0], where[1], view.nbytes))
        self.pos += view.nbytes
        return view.nbytes

    def _flush_pending(self) -> None:
        if self._pending:
            self.segments.append(bytes(self._pending))
            self._pending = bytearray()

    def finish(self) -> list[byte_writer.Segment]:
        self._flush_pending()
        return self.segments


class ThreadSink:
    """Writes in the calling thread (checkpoint.writer: thread, or no memfd here)."""

    def __init__(self) -> None:
        self._views: dict[int, memoryview] = {}

    def add_buffer(self, buffer: HostBuffer) -> None:
        self._views[buffer.id] = memoryview(buffer.map)

    def drop_buffer(self, buffer: HostBuffer) -> None:
        view = self._views.pop(buffer.id, None)
        if view is not None:
            view.release()

    def write(
        self, path: Path, segments: list[byte_writer.Segment], direct: bool
    ) -> tuple[int, str, str]:
        return byte_writer.write_file(str(path), segments, self._views, direct=direct)

    def close(self) -> None:
        for view in self._views.values():
            view.release()
        self._views.clear()


class ProcessSink:
    """The rank's writer process (eurotrain/checkpoint/byte_writer.py, no torch inside): it maps
    the staging buffers and writes, hashes and fsyncs files while this process trains."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        spec = importlib.util.find_spec(byte_writer.__name__)
        assert spec is not None and spec.origin is not None
        # Run the file itself (stdlib only): no import of torch or eurotrain, a start of ~50 ms.
        code = (
            "import importlib.util as u, sys; s = u.spec_from_file_location('byte_writer', "
            "sys.argv[1]); m = u.module_from_spec(s); s.loader.exec_module(m); "
            "m.serve_fd(int(sys.argv[2]))"
        )
        # The stop signals are blocked while it starts (the mask passes through fork and exec,
        # and the writer unblocks them once it ignores them): srun passes SLURM's USR1 warning
        # to every process of a rank, and one arriving during the writer's start would kill it.
        # Only this thread blocks them: the trainer still hears them.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, byte_writer.STOP_SIGNALS)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", code, spec.origin, str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._lock = threading.Lock()

    def _dead(self) -> OSError:
        code = self._proc.poll()
        return OSError(
            errno.EPIPE, f"the checkpoint writer process ended (exit code {code}); see its stderr"
        )

    def add_buffer(self, buffer: HostBuffer) -> None:
        with self._lock:
            try:
                self._conn.send(("buffer", buffer.id, buffer.size))
                reduction.send_handle(self._conn, buffer.fd, self._proc.pid)
            except OSError:
                raise self._dead() from None

    def drop_buffer(self, buffer: HostBuffer) -> None:
        with self._lock, contextlib.suppress(OSError):  # gone already: nothing to forget
            self._conn.send(("forget", buffer.id))

    def write(
        self, path: Path, segments: list[byte_writer.Segment], direct: bool
    ) -> tuple[int, str, str]:
        with self._lock:
            try:
                self._conn.send(("write", str(path), segments, direct))
                reply = self._conn.recv()
            except (OSError, EOFError):
                raise self._dead() from None
        if reply[0] == "error":
            raise OSError(reply[1], reply[2])
        return int(reply[1]), str(reply[2]), str(reply[3])

    def close(self) -> None:
        self._conn.close()  # the writer ends at end of file
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


Sink = ThreadSink | ProcessSink


def make_sink(kind: str) -> Sink:
    """The writer ``checkpoint.writer`` asks for; a thread where memfd is missing (not Linux)."""
    if kind == "process" and hasattr(os, "memfd_create"):
        return ProcessSink()
    return ThreadSink()


class HashingWriter(FileSystemWriter):
    """FileSystemWriter writing this rank's data file through a Sink; ``files`` then holds its
    name, size and checksum for the commit marker."""

    def __init__(
        self,
        path: Path,
        sink: Sink,
        buffers: list[HostBuffer],
        step: int,
        rank: int,
        direct: bool = False,
    ) -> None:
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1)
        self._sink, self._buffers, self._direct = sink, buffers, direct
        self._step, self._rank = step, rank
        self.files: dict[str, dict[str, Any]] = {}
        self.io = ""
        """How the data file was written (byte_writer.write_file's "how")."""

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        if os.environ.get(ENOSPC_HOOK) == str(self._step):
            raise OSError(errno.ENOSPC, f"No space left on device (test hook {ENOSPC_HOOK})")
        name = f"{plan.storage_data.prefix}0.distcp"
        recorder = Recorder(self._buffers)
        results = []
        # Byte items first, then tensors, as DCP orders them.
        items = sorted(plan.items, key=lambda item: item.type != WriteItemType.BYTE_IO)
        crc = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)  # SHA-256 covers every byte instead
        try:
            for item in items:
                offset = recorder.pos
                data: Any = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    recorder.write(data.getbuffer())
                else:
                    tensor = data.detach()
                    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
                        tensor = tensor.clone()  # torch.save writes a view's whole storage
                    torch.save(tensor, cast(IO[bytes], recorder))
                info = _StorageInfo(name, offset, recorder.pos - offset)
                results.append(WriteResult(item.index, recorder.pos - offset, info))
        finally:
            torch.serialization.set_crc32_options(crc)
        path = Path(self.path) / name
        size, digest, self.io = self._sink.write(path, recorder.finish(), self._direct)
        assert size == recorder.pos, f"{path}: wrote {size} bytes of {recorder.pos}"
        self.files[name] = {"size": size, DIGEST: digest}
        if os.environ.get(KILL_HOOK) == f"{self._rank}:{self._step}":
            os.truncate(path, size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future
