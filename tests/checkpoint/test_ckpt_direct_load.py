"""Loading tensors straight into place: which items the safe reader reads directly (their bytes
around the data exactly as eurotrain's writer puts them), and that every way of reading gives
what DCP's own reader gives; values parsed once per distinct bytes."""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from eurotrain.checkpoint import CheckpointConfig, CheckpointError
from eurotrain.checkpoint.checkpointer import Checkpointer
from eurotrain.checkpoint.safe_reader import (
    SafeFileSystemReader,
    SafeLoadPlanner,
    load_state,
)
from eurotrain.checkpoint.verify import verify_checkpoint
from eurotrain.parallel.engine import ModelState, OptimizerState
from eurotrain.state import TrainState


class Mixed(nn.Module):
    """Tensors of several kinds: fp32, bf16, int64, 0-d, empty, and one non-contiguous."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(300, 70))
        self.h = nn.Parameter(torch.randn(50, 3).to(torch.bfloat16))
        self.register_buffer("count", torch.arange(1000, dtype=torch.int64))
        self.register_buffer("scale", torch.tensor(0.25))
        self.register_buffer("nothing", torch.zeros(0, 4))
        self.register_buffer("turned", torch.randn(40, 30).t())  # staged contiguous


DIRECT = {"model.w", "model.h", "model.count", "model.scale", "model.turned"}
"""The model's tensors the writer stores from its template: all but the empty one."""


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = Mixed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    (model.w.sum() + model.h.float().sum()).backward()
    opt.step()
    parts = {"model": ModelState(model), "optim": OptimizerState(model, opt), "train": TrainState()}
    ck = Checkpointer(CheckpointConfig(dir=str(tmp_path), interval=1), tmp_path, 0, 1)
    info = {"tokens_seen": 0, "layout": {}, "config_yaml": "x: 1\n"}
    try:
        ck.save(1, parts, info, sync=True)
    finally:
        ck.close()
    ckpt = tmp_path / "step-000001"
    _, metadata = verify_checkpoint(ckpt, "full")
    return ckpt, metadata, model.state_dict()


def _load(ckpt, metadata, state, direct: bool = True) -> SafeFileSystemReader:
    reader = SafeFileSystemReader(ckpt, metadata)
    if not direct:
        reader._read_direct = lambda *args: False  # type: ignore[method-assign]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(ckpt, ()), no_dist=True)
    return reader


def _targets(original: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    return {"model": {k: torch.full_like(v, 7) for k, v in original.items()}}


def test_eurotrain_files_are_read_directly_and_equal_dcps_reading(saved):
    ckpt, metadata, original = saved
    direct, generic = _targets(original), _targets(original)
    versions = {k: v._version for k, v in direct["model"].items()}
    reader = _load(ckpt, metadata, direct)
    assert _load(ckpt, metadata, generic, direct=False).direct == []
    assert set(reader.direct) == DIRECT  # the empty one: DCP's reader
    for name, want in original.items():
        assert torch.equal(direct["model"][name], want), name
        assert torch.equal(generic["model"][name], want), name
        assert direct["model"][name].stride() == generic["model"][name].stride()
        if f"model.{name}" in DIRECT:  # written as copy_ writes: autograd would notice
            assert direct["model"][name]._version > versions[name], name


def test_other_targets_read_through_one_buffer(saved):
    """A target of another dtype or a non-contiguous one: read into one buffer, then copied,
    as DCP's reader copies what torch.load returns."""
    ckpt, metadata, original = saved
    state = _targets(original)
    state["model"]["w"] = torch.zeros(70, 300).t()  # the same shape, transposed in memory
    state["model"]["count"] = torch.zeros(1000, dtype=torch.float64)
    reader = _load(ckpt, metadata, state)
    assert set(reader.direct) == DIRECT
    assert torch.equal(state["model"]["w"], original["w"])
    assert torch.equal(state["model"]["count"], original["count"].double())


def test_bytes_unlike_the_template_go_through_dcps_reader(saved):
    """The bytes around the data are compared with the writer's template for the dtype and
    shape the metadata gives; one differing byte and the item is left to torch.load."""
    ckpt, metadata, original = saved
    reader = SafeFileSystemReader(ckpt, metadata)
    spec = metadata.state_dict_metadata["model.w"]
    assert isinstance(spec, TensorStorageMetadata)
    head, tail = reader._template(torch.float32, (300, 70))  # type: ignore[misc]
    reader._templates[(torch.float32, (300, 70))] = (head[:-1] + b"?", tail)
    state = _targets(original)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(ckpt, ()), no_dist=True)
    assert set(reader.direct) == DIRECT - {"model.w"}
    assert torch.equal(state["model"]["w"], original["w"])


def test_dcps_own_files_go_through_its_reader(tmp_path):
    """Files written by DCP's FileSystemWriter (CRC32 in every record): nothing matches the
    template, everything loads as before."""
    original = {"w": torch.randn(64, 8), "b": torch.arange(10)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.save({"model": original}, checkpoint_id=tmp_path, no_dist=True)
    metadata = pickle.loads((tmp_path / ".metadata").read_bytes())  # written here: trusted
    state = _targets(original)
    assert _load(tmp_path, metadata, state).direct == []
    for name, want in original.items():
        assert torch.equal(state["model"][name], want)


def test_a_file_cut_after_verify_is_an_error_not_a_partial_load(saved):
    ckpt, metadata, original = saved
    data = ckpt / "__0_0.distcp"
    os.truncate(data, data.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=str(ckpt)):
        load_state(_targets(original), ckpt, metadata, ("model.",))


def test_equal_values_are_parsed_once_and_never_shared(tmp_path, monkeypatch):
    """An optimizer's hyper-parameters repeat for every parameter: the same bytes are checked
    and unpickled once, and each entry gets its own copy of a list."""
    values = {"a": [1, 2.5], "b": [1, 2.5], "c": "text", "d": "text", "e": [1, 2.5]}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.save({"x": values}, checkpoint_id=tmp_path, no_dist=True)
    metadata = pickle.loads((tmp_path / ".metadata").read_bytes())  # written here: trusted
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(1) or real_load(*a, **kw))
    state = {"x": dict.fromkeys(values)}
    _load(tmp_path, metadata, state)
    assert state["x"] == values
    assert state["x"]["a"] is not state["x"]["b"] and state["x"]["b"] is not state["x"]["e"]
    assert len(loads) == 2  # the list and the text
