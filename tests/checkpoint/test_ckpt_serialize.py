"""A save's serialization shortcuts give exactly torch.save's bytes: tensors replayed around the
bytes recorded for the first tensor of their kind, plain values serialized once per save."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

from eurotrain.checkpoint import CheckpointConfig, writer
from eurotrain.checkpoint.checkpointer import Checkpointer
from eurotrain.checkpoint.staging import HostBuffer
from eurotrain.parallel.engine import ModelState, OptimizerState
from eurotrain.state import TrainState

KINDS = {  # two different tensors of each kind
    "large fp32 (referenced)": lambda: torch.randn(1000, 100),
    "fp32 scalar": lambda: torch.randn(()),
    "bf16 vector": lambda: torch.randn(3).bfloat16(),
    "fp16 matrix": lambda: torch.randn(300, 300).half(),
    "int64": lambda: torch.randint(0, 1 << 40, (5, 7)),
    "bool": lambda: torch.rand(10) > 0.5,
    "uint16 (rebuilt from untyped storage)": lambda: torch.randint(0, 1 << 16, (9,)).to(
        torch.uint16
    ),
    "float8": lambda: torch.randn(8).to(torch.float8_e4m3fn),
    "transposed (storage order)": lambda: torch.randn(20, 30).t(),
    "conjugate view": lambda: torch.randn(4, dtype=torch.complex64).conj(),
    "negative view": lambda: torch.randn(4, dtype=torch.complex64).conj().imag,
    "empty": lambda: torch.empty(0, 3),
}


@pytest.fixture
def no_crc():
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)  # as HashingWriter.write_data does
    yield
    torch.serialization.set_crc32_options(crc)


def _torch_save(value) -> bytes:
    out = io.BytesIO()
    torch.save(value, out)
    return out.getvalue()


def _staged(buffer: HostBuffer, offset: int, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` copied into the buffer at ``offset``, keeping its strides and flags."""
    raw = tensor.resolve_conj().resolve_neg() if tensor.is_complex() else tensor
    storage = raw.untyped_storage()
    nbytes = storage.nbytes()
    flat = buffer.tensor(offset, torch.empty(nbytes, dtype=torch.uint8))
    flat.copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
    out = torch.empty(0, dtype=tensor.dtype).set_(
        flat.untyped_storage(), raw.storage_offset(), raw.shape, raw.stride()
    )
    if tensor.is_conj():
        out = out.conj()
    if tensor.is_neg():
        out = out._neg_view()
    return out


def _bytes(recorder: writer.Recorder, buffer: HostBuffer) -> bytes:
    return b"".join(
        s if isinstance(s, bytes) else bytes(buffer.map[s[1] : s[1] + s[2]])
        for s in recorder.finish()
    )


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("where", ["staged", "elsewhere"])
def test_replayed_tensors_are_torch_save_bytes(kind, where, no_crc):
    buffer = HostBuffer(1 << 22, shared=False, pin=False)
    try:
        tensors = [KINDS[kind](), KINDS[kind]()]
        if kind == "negative view":
            assert all(t.is_neg() for t in tensors)
        if where == "staged":
            tensors = [_staged(buffer, i << 21, t) for i, t in enumerate(tensors)]
        recorder = writer.Recorder([buffer])
        for t in tensors:  # the second one replays the bytes recorded with the first one
            recorder.save_tensor(t)
        assert _bytes(recorder, buffer) == b"".join(_torch_save(t) for t in tensors), kind
        replayed = [t for t in recorder._templates.values() if t is not None]
        assert len(replayed) == (0 if kind == "empty" else 1)
        if kind.startswith("large") and where == "staged":  # its data is not copied
            assert sum(isinstance(s, tuple) for s in recorder.finish()) == 2
    finally:
        buffer.close()


def test_one_recorder_replays_and_keeps_the_stream_order(no_crc):
    buffer = HostBuffer(1 << 22, shared=False, pin=False)
    try:
        tensors = [_staged(buffer, i << 20, torch.randn(64, 64)) for i in range(3)]
        tensors.insert(1, torch.randn(64, 64).t())  # another kind in between
        recorder = writer.Recorder([buffer])
        for t in tensors:
            recorder.save_tensor(t)
        assert len(recorder._templates) == 2
        assert _bytes(recorder, buffer) == b"".join(_torch_save(t) for t in tensors)
        assert recorder.pos == sum(len(_torch_save(t)) for t in tensors)
    finally:
        buffer.close()


def test_tensors_torch_save_writes_otherwise_are_not_replayed():
    param = torch.nn.Parameter(torch.randn(3))
    tagged = torch.randn(3)
    tagged.note = "x"  # type: ignore[attr-defined]
    for tensor in (param, torch.randn(3, requires_grad=True), tagged, torch.empty(0)):
        assert writer._template_key(tensor) is None


def _byte_item() -> WriteItem:
    return WriteItem(index=MetadataIndex("x"), type=WriteItemType.BYTE_IO)


VALUES = [0.001, 0.0, -0.0, 1, 1.0, True, math.nan, math.inf, None, "adamw", b"\x00",
          (0.9, 0.95), [1, 2.0], (), [(1, 2), (3,)], {"lr": 0.1}, {1, 2}]  # fmt: skip


def test_plain_values_are_serialized_once_and_exactly():
    planner = writer.CachingPlanner()
    plain = DefaultSavePlanner()
    for value in VALUES + VALUES:
        got = planner.transform_object(_byte_item(), value).getvalue()
        assert got == plain.transform_object(_byte_item(), value).getvalue(), value
    # 1, 1.0 and True; 0.0 and -0.0 are apart (equal in Python, not in the file)
    assert len(planner._serialized) == len(VALUES) - 2  # the dict and the set are not cached
    loaded = [torch.load(io.BytesIO(planner.transform_object(_byte_item(), v).getvalue()))
              for v in (1, 1.0, True, -0.0)]  # fmt: skip
    assert [type(v) for v in loaded] == [int, float, bool, float]
    assert math.copysign(1, loaded[3]) == -1


@pytest.mark.parametrize("sink", ["process", "thread"])
def test_a_save_is_byte_identical_to_one_through_torch_save(tmp_path, monkeypatch, sink):
    """An AdamW state (many parameters of few shapes, each with its hyper-parameters) saved with
    the shortcuts and without: the same data file, byte for byte."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(40, 40) for _ in range(6)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, 40)).sum().backward()
    opt.step()
    parts = {"model": ModelState(model), "optim": OptimizerState(model, opt), "train": TrainState()}
    info = {"tokens_seen": 0, "layout": {}, "config_yaml": "x: 1\n"}

    def save(directory) -> bytes:
        cfg = CheckpointConfig(dir=str(directory), interval=1, keep_last=0, writer=sink)
        ck = Checkpointer(cfg, directory, 0, 1, log=lambda m: None)
        try:
            ck.save(1, parts, info, sync=True)
        finally:
            ck.close()
        (data,) = (directory / "step-000001").glob("*.distcp")
        return data.read_bytes()

    fast = save(tmp_path / "fast")
    monkeypatch.setattr(writer.Recorder, "save_tensor", lambda self, t: torch.save(t, self))
    monkeypatch.setattr(writer.CachingPlanner, "transform_object",
                        DefaultSavePlanner.transform_object)  # fmt: skip
    assert save(tmp_path / "plain") == fast
