"""The GPU side of checkpoint staging (eurotrain/checkpoint/staging.py): pinning its buffers, and
the device the background copy runs on. The pinning tests replace the CUDA runtime bindings, so
they run on a CPU; the device test needs two GPUs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from multiproc import REPO

from eurotrain.checkpoint.staging import HostBuffer
from eurotrain.errors import CheckpointError


class FakeCudart:
    """torch.cuda.cudart()'s host (un)registration, answering ``register_code``."""

    def __init__(self, register_code: int) -> None:
        self.register_code = register_code
        self.registered: list[tuple[int, int]] = []
        self.unregistered: list[int] = []

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:
        self.registered.append((ptr, size))
        return self.register_code

    def cudaHostUnregister(self, ptr: int) -> int:
        self.unregistered.append(ptr)
        return 0

    def cudaError(self, code: int) -> int:
        return code

    def cudaGetErrorString(self, code: int) -> str:
        return {2: "out of memory"}.get(code, "unknown error")


@pytest.fixture
def cudart(monkeypatch, request) -> FakeCudart:
    fake = FakeCudart(request.param)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(torch.cuda, "check_error", lambda code: None)
    return fake


@pytest.mark.parametrize("cudart", [2], indirect=True)
@pytest.mark.parametrize("shared", [False, True])
def test_a_failed_pin_is_an_error_naming_the_code_and_the_fix(cudart, shared) -> None:
    """Falling back to unpinned memory would leave CUDA's last error set, and the next kernel
    launch would fail with it: the failure is reported where it happens instead."""
    with pytest.raises(CheckpointError) as raised:
        HostBuffer(1 << 20, shared=shared, pin=True)
    message = str(raised.value)
    assert "cudaHostRegister" in message and "CUDA error 2 (out of memory)" in message
    assert "checkpoint.max_in_flight" in message and "--mem" in message
    assert len(cudart.registered) == 1 and cudart.registered[0][1] == 1 << 20
    assert cudart.unregistered == []  # nothing was pinned, so nothing is unpinned


@pytest.mark.parametrize("cudart", [0], indirect=True)
def test_a_pinned_buffer_is_unpinned_once_on_close(cudart) -> None:
    buffer = HostBuffer(1 << 20, shared=False, pin=True)
    assert buffer.pinned
    ptr = buffer.base.data_ptr()
    assert cudart.registered == [(ptr, 1 << 20)]
    buffer.close()
    assert cudart.unregistered == [ptr]


def test_the_cpu_path_never_touches_cuda(monkeypatch) -> None:
    def no_cuda() -> None:
        raise AssertionError("the CPU path called torch.cuda.cudart()")

    monkeypatch.setattr(torch.cuda, "cudart", no_cuda)
    buffer = HostBuffer(1 << 20, shared=True, pin=False)
    assert not buffer.pinned
    buffer.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_staging_on_gpu_1_creates_no_context_on_gpu_0() -> None:
    """A rank on GPU 1 must not hold memory on GPU 0: the background copy thread starts with
    device 0 current, and restoring device 0's stream would create a context there."""
    script = textwrap.dedent(
        """
        import torch
        from eurotrain.checkpoint.staging import Stager

        torch.cuda.set_device(1)
        state = {"w": torch.randn(1 << 20, device="cuda:1")}
        stager = Stager(shared=False, cuda=True)
        staged = stager.stage(state)
        staged.wait()
        assert torch.equal(staged.state["w"], state["w"].cpu())
        staged.release()
        stager.close()
        assert torch._C._cuda_hasPrimaryContext(1)
        assert not torch._C._cuda_hasPrimaryContext(0), "a CUDA context was created on GPU 0"
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
