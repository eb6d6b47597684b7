"""Staging a state dict to host memory while training goes on.

``Stager.stage`` returns at once with a state dict of the same shape whose tensors (and
DTensors' local shards) are views into one host buffer, and copies the live tensors into it on a
background thread (on a GPU: device-to-host copies on a side stream into pinned memory). Only
the optimizer step changes the tensors a checkpoint holds, so the trainer waits for the copy
(``Staged.wait``) just before the next optimizer step: the copy overlaps the forward and backward
of the step after the save. Host-to-host copies (CPU training, CPU-offloaded parameters) are cut
into pieces that every thread waiting for the copy takes too (the checkpoint thread, which
writes after it, and a trainer that reaches its optimizer step before it is done): they copy
alongside the background thread instead of sleeping.

The buffers are anonymous memory maps, reused from save to save (no allocation, no page faults
after the first save). For the writer process they are memfd files that process maps too: the
staged bytes are never copied again before they reach the file. Each staged tensor is a tensor
over exactly its bytes (``torch.frombuffer``), so that torch.save writes it alone.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from eurotrain.errors import CheckpointError

ALIGN = 64
"""Byte alignment of each staged tensor in a buffer."""
CHUNK = 16 << 20
"""Bytes per piece of a host-to-host staging copy (what a waiting thread takes at a time)."""


class HostBuffer:
    """One staging buffer: an anonymous (or memfd, to share) memory map, pinned on GPUs."""

    _next_id = 0

    def __init__(self, size: int, *, shared: bool, pin: bool) -> None:
        HostBuffer._next_id += 1
        self.id = HostBuffer._next_id
        self.size = max(size, mmap.PAGESIZE)
        self.fd = -1
        if shared:
            self.fd = os.memfd_create(f"eurotrain-ckpt-{self.id}", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, self.size)
            self.map = mmap.mmap(self.fd, self.size)
        else:
            self.map = mmap.mmap(-1, self.size)
        self.base = torch.frombuffer(self.map, dtype=torch.uint8)
        self.pinned = False
        if pin:
            # Registered host memory: device-to-host copies into it run asynchronously at full
            # speed (DCP's stager does the same for shared memory).
            try:
                _register(self.base, self.size)
            except CheckpointError:
                self.close()
                raise
            self.pinned = True
        self.busy = False

    def tensor(self, offset: int, like: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor shaped like ``like`` over exactly its bytes at ``offset``."""
        if like.numel() == 0:
            return torch.empty(like.shape, dtype=like.dtype)
        nbytes = like.numel() * like.element_size()
        flat = torch.frombuffer(self.map, dtype=torch.uint8, count=nbytes, offset=offset)
        return flat.view(like.dtype).view(like.shape)

    def close(self) -> None:
        if self.pinned:
            self.pinned = False
            torch.cuda.check_error(
                int(torch.cuda.cudart().cudaHostUnregister(self.base.data_ptr()))
            )
        del self.base
        with contextlib.suppress(BufferError):  # a staged tensor still refers to it: freed
            self.map.close()  # with that tensor
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _register(base: torch.Tensor, size: int) -> None:
    """cudaHostRegister ``size`` bytes at ``base``, or raise a CheckpointError saying why.

    No silent fallback to unpinned memory: a failed call also stays the calling thread's last
    CUDA error, which PyTorch reads after every kernel launch, so the next launch would fail
    with this unrelated error. torch.cuda.cudart() has no cudaGetLastError to clear it (it binds
    error strings, the profiler, host (un)registration, streams and memory info).
    """
    cudart = torch.cuda.cudart()
    code = int(cudart.cudaHostRegister(base.data_ptr(), size, 0))
    if code != 0:
        name = cudart.cudaGetErrorString(cudart.cudaError(code))
        raise CheckpointError(
            f"pinning a {size / 2**30:.2f} GiB checkpoint staging buffer (cudaHostRegister) "
            f"failed with CUDA error {code} ({name}); each async save in flight holds one "
            "such buffer (a copy of this rank's checkpoint share): lower "
            "checkpoint.max_in_flight, or give the job more host memory per node (--mem)"
        )


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _tensors(obj: Any, out: list[torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            _tensors(value, out)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _tensors(value, out)


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Staged:
    """A staged state dict, its copy in progress, and the buffer it occupies.

    Host-to-host copies are a list of pieces taken in order by the background thread and by
    ``wait()``; a device-to-host copy is one piece (a stream that the background thread
    synchronizes)."""

    def __init__(self, state: dict[str, Any], buffer: HostBuffer | None) -> None:
        self.state = state
        self.buffer = buffer
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._pieces: list[Callable[[], object]] = []
        self._next = 0
        self._left = 0
        self._lock = threading.Lock()

    def _start(self, pieces: list[Callable[[], object]]) -> None:
        self._pieces, self._left = pieces, len(pieces)
        if not pieces:
            self._done.set()
            return
        threading.Thread(target=self._work, name="eurotrain-ckpt-stage", daemon=True).start()

    def _work(self) -> None:
        """Take pieces until none is left (the background thread, and a waiting trainer). The
        copy is done when every piece taken has finished; after a failure the rest are dropped."""
        while True:
            with self._lock:
                if self._error is not None and self._next < len(self._pieces):
                    self._left -= len(self._pieces) - self._next
                    self._next = len(self._pieces)
                    if self._left == 0:
                        self._done.set()
                if self._next >= len(self._pieces):
                    return
                piece = self._pieces[self._next]
                self._next += 1
            try:
                piece()
            except BaseException as e:  # raised where the copy is awaited
                with self._lock:
                    self._error = self._error or e
            with self._lock:
                self._left -= 1
                if self._left == 0:
                    self._done.set()

    def wait(self) -> None:
        """Block until the copy is complete (the live tensors may change after this); the
        caller copies what the background thread has not started yet."""
        if not self._done.is_set():
            self._work()
        self._done.wait()
        if self._error is not None:
            raise self._error

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def release(self) -> None:
        """The write is over: the buffer may take the next save."""
        self.state = {}  # the views into the buffer go with it
        if self.buffer is not None:
            self.buffer.busy = False


def _pieces(dst: torch.Tensor, src: torch.Tensor, chunk: int) -> list[Callable[[], object]]:
    """Copies of ``src`` into ``dst`` (same shape), a flat slice of at most ``chunk`` bytes each
    where both are contiguous."""
    nbytes = src.numel() * src.element_size()
    if nbytes <= chunk or not (src.is_contiguous() and dst.is_contiguous()):
        return [functools.partial(torch.Tensor.copy_, dst, src)]
    step = max(chunk // src.element_size(), 1)
    return [
        functools.partial(torch.Tensor.copy_, d, s)
        for d, s in zip(dst.view(-1).split(step), src.view(-1).split(step), strict=True)
    ]


class Stager:
    """Stages state dicts into reusable host buffers (at most ``max_buffers`` kept)."""

    def __init__(
        self,
        *,
        shared: bool,
        cuda: bool,
        max_buffers: int = 1,
        on_new_buffer: Callable[[HostBuffer], None] | None = None,
        on_drop_buffer: Callable[[HostBuffer], None] | None = None,
        chunk: int = CHUNK,
    ) -> None:
        self.shared, self.cuda, self.max_buffers = shared, cuda, max_buffers
        self.chunk = chunk
        self._buffers: list[HostBuffer] = []
        self._on_new = on_new_buffer
        self._on_drop = on_drop_buffer

    def _buffer(self, size: int) -> HostBuffer:
        free = [b for b in self._buffers if not b.busy]
        fits = [b for b in free if b.size >= size]
        if fits:
            chosen = min(fits, key=lambda b: b.size)
        else:
            # Too small (the state grew) or all busy: replace the smallest free buffer.
            if free and len(self._buffers) >= self.max_buffers:
                self._drop(min(free, key=lambda b: b.size))
            chosen = HostBuffer(size, shared=self.shared, pin=self.cuda)
            self._buffers.append(chosen)
            if self._on_new is not None:
                self._on_new(chosen)
        chosen.busy = True
        return chosen

    def _drop(self, buffer: HostBuffer) -> None:
        self._buffers.remove(buffer)
        if self._on_drop is not None:
            self._on_drop(buffer)
        buffer.close()

    def stage(self, state: dict[str, Any]) -> Staged:
        """Start copying ``state``'s tensors to host memory; returns the staged dict at once
        (its tensors are filled when ``wait()`` returns)."""
        tensors: list[torch.Tensor] = []
        _tensors(state, tensors)
        offsets, size = {}, 0
        for t in tensors:
            local = _local(t)
            if id(local) not in offsets:
                offsets[id(local)] = size
                size += _aligned(local.numel() * local.element_size())
        buffer = self._buffer(size)
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        staged_of: dict[int, torch.Tensor] = {}

        def stage_one(t: torch.Tensor) -> torch.Tensor:
            local = _local(t)
            if id(local) not in staged_of:
                staged_of[id(local)] = buffer.tensor(offsets[id(local)], local)
                copies.append((staged_of[id(local)], local))
            host = staged_of[id(local)]
            if isinstance(t, DTensor):
                return DTensor(host, t._spec, requires_grad=False)
            return host

        staged = Staged(_map(state, stage_one), buffer)
        if self.cuda and any(src.is_cuda for _, src in copies):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())  # after the last update

            def device_to_host() -> None:
                # A new thread's current device is 0. Leaving torch.cuda.stream() alone would
                # restore device 0's stream, which selects device 0 and so creates a CUDA
                # context there on every rank; torch.cuda.device() makes the stream's device
                # current first and, on exit, changes back only to a device that has a context.
                with torch.cuda.device(stream.device), torch.cuda.stream(stream):
                    for dst, src in copies:
                        dst.copy_(src.detach(), non_blocking=buffer.pinned)
                stream.synchronize()

            staged._start([device_to_host])
        else:
            staged._start(
                [piece for dst, src in copies for piece in _pieces(dst, src.detach(), self.chunk)]
            )
        return staged

    def close(self) -> None:
        for buffer in list(self._buffers):
            self._drop(buffer)


def _map(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_map(v, fn) for v in obj)
    return obj
