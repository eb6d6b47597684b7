"""DCP's file format, written from staged host memory by the rank's writer, checksummed as written.

``HashingWriter`` is a ``FileSystemWriter`` whose ``write_data`` lays out this rank's one data
file exactly as DCP's would (each item through ``torch.save``, byte items as they are, offsets
and lengths in the metadata), but records the bytes instead of writing them: torch.save hands
the tensor's storage to the stream as a view of the staging buffer, which becomes a reference
(buffer, offset, length); only the small zip headers and pickles are copied. The recorded
segments go to a ``Sink``: the writer process (``ProcessSink``) or this process (``ThreadSink``,
where no memfd exists). Either returns the file's size and SHA-256, computed while writing.

``.metadata`` stays DCP's (written by ``finish``); any reader of DCP checkpoints reads these.

A model's checkpoint has thousands of items (an 80-layer Llama with AdamW: 723 parameters, three
tensors of state each, and in the flattened optimizer state eleven hyper-parameters per
parameter, twelve with an LR scheduler), and a torch.save costs ~0.1 ms of Python whatever its
size, on the checkpoint thread, which holds the GIL the trainer needs. So within a save, each
distinct plain value (a float, a tuple of them, ...) is serialized once (``CachingPlanner``), and
tensors of one kind (dtype, shape, strides, storage size, flags) are written from one
torch.save: its bytes around the data, recorded with the first such tensor, hold nothing of the
data itself (the CRC32 is off), so the next ones replay them around their own data
(``Recorder.save_tensor``). Both give exactly torch.save's bytes (tested).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.util
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from multiprocessing import reduction
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
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


_CRC_SWITCH = threading.RLock()


@contextlib.contextmanager
def crc32_off() -> Iterator[None]:
    """torch.save without its CRC32 per record, then as before. The switch is process-wide: the
    lock keeps a save on the checkpoint thread and a load's templates (a rollback) from
    restoring each other's setting in the wrong order."""
    with _CRC_SWITCH:
        before = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            yield
        finally:
            torch.serialization.set_crc32_options(before)


def _address(view: memoryview) -> int:
    """Where the bytes of ``view`` are in memory."""
    return int(np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0])


class Recorder(io.RawIOBase):
    """A write-only stream that records what torch.save writes, as segments."""

    def __init__(self, buffers: list[HostBuffer]) -> None:
        super().__init__()
        self.segments: list[byte_writer.Segment] = []
        self.pos = 0
        self._pending = bytearray()
        self._ranges = [(b.base.data_ptr(), b) for b in buffers]
        self._templates: dict[tuple[Any, ...], tuple[bytes, bytes] | None] = {}

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def _where(self, address: int, nbytes: int) -> tuple[int, int] | None:
        """(buffer id, offset) of these bytes where they are long enough to be referenced."""
        if nbytes < _INLINE:
            return None
        for base, buffer in self._ranges:
            if base <= address and address + nbytes <= base + buffer.size:
                return buffer.id, address - base
        return None

    def _append(self, address: int, nbytes: int, data: Callable[[], Any]) -> None:
        """A reference to these bytes where a staging buffer holds them and they are long
        enough, else a copy of ``data()``."""
        where = self._where(address, nbytes)
        if where is None:
            self._pending += data()
        else:
            self._flush_pending()
            self.segments.append((where[0], where[1], nbytes))
        self.pos += nbytes

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        address = _address(view) if view.nbytes >= _INLINE else 0  # 0: in no buffer
        self._append(address, view.nbytes, lambda: view)
        return view.nbytes

    def write_bytes(self, data: bytes) -> None:
        """Bytes to copy as they are (a serialized value, torch.save's headers)."""
        self._pending += data
        self.pos += len(data)

    def _flush_pending(self) -> None:
        if self._pending:
            self.segments.append(bytes(self._pending))
            self._pending = bytearray()

    def finish(self) -> list[byte_writer.Segment]:
        self._flush_pending()
        return self.segments

    def save_tensor(self, tensor: torch.Tensor) -> None:
        """Write exactly what ``torch.save(tensor, self)`` writes (CRC32 off), replaying the
        bytes recorded around the data of an earlier tensor of the same kind."""
        key = _template_key(tensor)
        if key is not None and key not in self._templates:
            self._templates[key] = _template(tensor)
        template = None if key is None else self._templates[key]
        if template is None:
            torch.save(tensor, cast(IO[bytes], self))
            return
        head, tail = template
        self.write_bytes(head)
        storage = tensor.untyped_storage()  # its whole storage, in memory order, as torch.save
        address, nbytes = storage.data_ptr(), storage.nbytes()
        self._append(address, nbytes, lambda: ctypes.string_at(address, nbytes))
        self.write_bytes(tail)


def _template_key(tensor: torch.Tensor) -> tuple[Any, ...] | None:
    """Everything torch.save writes of a tensor besides its data (the rebuild arguments), or
    None for a tensor it writes another way (a subclass, Python attributes, not on the host)."""
    if (
        type(tensor) is not torch.Tensor
        or tensor.device.type != "cpu"
        or tensor.layout != torch.strided
        or tensor.is_quantized
        or tensor.requires_grad
        or tensor.__dict__
    ):
        return None
    storage = tensor.untyped_storage()
    if storage.nbytes() == 0:
        return None
    metadata = torch._utils.get_tensor_metadata(tensor)  # type: ignore[no-untyped-call]
    return (
        tensor.dtype,
        tuple(tensor.shape),
        tensor.stride(),
        tensor.storage_offset(),
        storage.nbytes(),
        tuple(sorted(metadata.items())),
    )


class _Capture(io.RawIOBase):
    """What torch.save writes of one tensor: bytes, with the storage's own write marked."""

    def __init__(self, storage: torch.UntypedStorage) -> None:
        super().__init__()
        self.parts: list[bytes | None] = []  # None: the storage's bytes
        self._storage = (storage.data_ptr(), storage.nbytes())

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        address = _address(view)
        self.parts.append(None if (address, view.nbytes) == self._storage else bytes(view))
        return view.nbytes


def _template(tensor: torch.Tensor) -> tuple[bytes, bytes] | None:
    """torch.save's bytes before and after the tensor's data, or None where its data is not
    one write of the whole storage (then every tensor of that kind goes through torch.save)."""
    capture = _Capture(tensor.untyped_storage())
    torch.save(tensor, cast(IO[bytes], capture))
    if capture.parts.count(None) != 1:
        return None
    at = capture.parts.index(None)
    return b"".join(cast(list[bytes], capture.parts[:at])), b"".join(
        cast(list[bytes], capture.parts[at + 1 :])
    )


def stored_template(dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[bytes, bytes] | None:
    """The bytes HashingWriter writes before and after the data of a contiguous tensor of this
    dtype and shape (torch.save with CRC32 off), or None where it writes no such template (an
    empty tensor). The safe reader compares a data file's bytes with these to read the data
    straight into place."""
    tensor = torch.empty(shape, dtype=dtype)  # never touched: no memory is written
    if _template_key(tensor) is None:
        return None
    with crc32_off():
        return _template(tensor)


def _plain_key(value: Any, depth: int = 0) -> tuple[Any, ...] | None:
    """A key equal only for values torch.save writes the same way (type and exact value), or
    None for anything but None, bool, int, float, str, bytes and short tuples or lists of them."""
    kind = type(value)
    if value is None or kind in (bool, int, str, bytes):
        return (kind.__name__, value)
    if kind is float:
        return ("float", struct.pack("<d", value))  # -0.0 and every NaN apart
    if kind in (tuple, list) and depth < 4 and len(value) <= 64:
        keys = tuple(_plain_key(item, depth + 1) for item in value)
        return None if None in keys else (kind.__name__, keys)
    return None


class CachingPlanner(DefaultSavePlanner):
    """DCP's default save planner, serializing each distinct plain value once per save: the
    flattened optimizer state repeats every hyper-parameter for every parameter."""

    def __init__(self) -> None:
        super().__init__()
        self._serialized: dict[tuple[Any, ...], bytes] = {}

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:
        key = _plain_key(object) if write_item.type == WriteItemType.BYTE_IO else None
        if key is None:
            return super().transform_object(write_item, object)
        data = self._serialized.get(key)
        if data is None:
            data = super().transform_object(write_item, object).getvalue()
            self._serialized[key] = data
        return io.BytesIO(data)


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
        with crc32_off():  # SHA-256 covers every byte instead
            for item in items:
                offset = recorder.pos
                data: Any = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    recorder.write_bytes(data.getvalue())  # no copy of a cached value
                else:
                    tensor = data.detach()
                    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
                        tensor = tensor.clone()  # torch.save writes a view's whole storage
                    recorder.save_tensor(tensor)
                info = _StorageInfo(name, offset, recorder.pos - offset)
                results.append(WriteResult(item.index, recorder.pos - offset, info))
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
