"""Loading a checkpoint without trusting it: DCP's reader and planner with every unpickling
path restricted, and the keys checked both ways.

Where DCP unpickles, and what eurotrain does about it (torch 2.13):

- ``FileSystemReader.read_metadata``: plain ``pickle.load`` of ``.metadata``. Replaced: the
  metadata is read once by ``safe_metadata.read_metadata`` (checksum against the commit marker,
  the restricted unpickler of ``safe_pickle.py``, then checks that what it describes is what the
  data files hold) and handed to the reader.
- ``FileSystemReader.read_data``: tensors through ``torch.load(weights_only=True)``. Kept for
  tensors whose bytes around the data differ from what eurotrain's writer puts there (files
  DCP wrote, strided tensors); eurotrain's own are compared with the writer's template for the
  dtype and shape the checked metadata gives and then read straight into place, unpickling
  nothing.
- ``DefaultLoadPlanner.load_bytes``: non-tensor values (the ``train`` JSON, RNG text, the
  optimizer's hyper-parameters) through ``torch.load(weights_only=False)``: a crafted data file
  runs code there. Replaced by ``torch.load(weights_only=True)`` and a check for plain data,
  once per distinct bytes, the checked value then stored where DCP would store its own.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import io
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.autograd.graph import increment_version
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from eurotrain.checkpoint.safe_pickle import Refused, nesting
from eurotrain.checkpoint.storage import open_regular
from eurotrain.checkpoint.writer import stored_template
from eurotrain.errors import CheckpointError

_PLAIN = (str, int, float, bool, type(None))
_PLAIN_ITEMS = 1_000_000
"""Most items (with repeats) one value may hold."""
_UNSEEN = object()
_SHOWN = 4
"""Names listed per group in an error about keys before '... (N in all)'."""


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader that serves metadata read by ``read_metadata`` and reads data only
    for a SafeLoadPlanner (whose load_bytes is restricted)."""

    def __init__(self, path: Path, metadata: Metadata) -> None:
        super().__init__(path)
        self._metadata = metadata
        self._templates: dict[tuple[torch.dtype, tuple[int, ...]], tuple[bytes, bytes] | None] = {}
        self.direct: list[str] = []
        """Keys of the tensor items read straight into place (the rest went through DCP's
        reader)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError("per-rank DCP metadata (use_collectives=False) is not used here")
        if self._metadata.storage_meta is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata

    def read_data(self, plan: LoadPlan, planner: Any) -> Any:
        """Tensors whose bytes in the file are exactly what eurotrain's writer puts around
        such a tensor's data are read straight into place (one read, no torch.load, no
        intermediate copy where the target is a whole contiguous host tensor); every other
        item (values, other files' layouts, transforms) goes through DCP's reader."""
        if not isinstance(planner, SafeLoadPlanner):
            raise TypeError("SafeFileSystemReader reads only for a SafeLoadPlanner")
        rest: list[ReadItem] = []
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            name = self.storage_data[item.storage_index].relative_path
            per_file.setdefault(name, [])
            if item.type == LoadItemType.TENSOR:
                per_file[name].append(item)
            else:
                rest.append(item)
        for name, items in per_file.items():
            # Every file read is a regular one, whatever was verified (checkpoint.verify none
            # checks nothing): DCP's reader, which reads the rest, follows links and FIFOs.
            fd = open_regular(Path(self.path) / name)
            try:
                for item in sorted(items, key=lambda i: self.storage_data[i.storage_index].offset):
                    if not self._read_direct(fd, name, item, planner):
                        rest.append(item)
            finally:
                os.close(fd)
        return super().read_data(dataclasses.replace(plan, items=rest), planner)

    def _template(self, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[bytes, bytes] | None:
        key = (dtype, shape)
        if key not in self._templates:
            try:
                self._templates[key] = stored_template(dtype, shape)
            except Exception:  # a dtype torch.empty refuses: DCP's reader decides
                self._templates[key] = None
        return self._templates[key]

    def _read_direct(self, fd: int, name: str, req: ReadItem, planner: SafeLoadPlanner) -> bool:
        """Read one tensor item without torch.load where its file bytes, all but the data,
        equal the writer's template for the dtype and chunk shape the checked metadata gives;
        False (nothing done) otherwise."""
        path = Path(self.path) / name
        info: _StorageInfo = self.storage_data[req.storage_index]
        entry = self._metadata.state_dict_metadata.get(req.storage_index.fqn)
        if info.transform_descriptors or not isinstance(entry, TensorStorageMetadata):
            return False
        where = tuple(req.storage_index.offset or ())
        chunk = next((c for c in entry.chunks if tuple(c.offsets) == where), None)
        if chunk is None:
            return False
        dtype, shape = entry.properties.dtype, tuple(chunk.sizes)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > info.length:  # checked first: no template of a crafted giant shape
            return False
        template = self._template(dtype, shape)
        if template is None:
            return False
        head, tail = template
        start = info.offset + len(head)
        if info.length != len(head) + nbytes + len(tail):
            return False
        if (
            _pread(fd, len(head), info.offset) != head
            or _pread(fd, len(tail), start + nbytes) != tail
        ):
            return False
        target = planner.resolve_tensor(req).detach()
        whole = not any(req.storage_offsets) and tuple(req.lengths) == shape
        if (
            whole
            and type(target) is torch.Tensor
            and target.device.type == "cpu"
            and target.dtype == dtype
            and target.is_contiguous()
            and not (target.is_conj() or target.is_neg())
            and tuple(target.shape) == shape
        ):
            _pread_into(fd, target, start, path)
            increment_version(target)  # as copy_ would: autograd sees the tensor changed
        else:  # a part of the chunk, another dtype or device: through one buffer
            source = torch.empty(shape, dtype=dtype)
            _pread_into(fd, source, start, path)
            source = narrow_tensor_by_index(source, req.storage_offsets, req.lengths)
            if target.size() != source.size():
                raise CheckpointError(
                    f"{path}: {req.storage_index.fqn} holds {tuple(source.size())} where "
                    f"this run has {tuple(target.size())}"
                )
            target.copy_(source)
        planner.commit_tensor(req, target)
        self.direct.append(req.storage_index.fqn)
        return True


def _pread(fd: int, length: int, offset: int) -> bytes:
    """Up to ``length`` bytes at ``offset`` (fewer at the end of the file)."""
    parts, got = [], 0
    while got < length and (part := os.pread(fd, length - got, offset + got)):
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _pread_into(fd: int, tensor: torch.Tensor, offset: int, path: Path) -> None:
    """Fill a contiguous host tensor with the file's bytes at ``offset``."""
    nbytes = tensor.numel() * tensor.element_size()
    view = memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")
    got = 0
    while got < nbytes:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise CheckpointError(f"{path}: ends inside a tensor (cut short after it was verified)")
        got += n


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner with non-tensor values unpickled by torch.load(weights_only=True)
    and checked to be plain data, and the keys under ``strict`` prefixes required to match the
    checkpoint's exactly: none missing (on any rank) and none left over (over all ranks, so
    that pipeline stages holding different parameters are judged together)."""

    def __init__(self, ckpt: Path, strict: tuple[str, ...]) -> None:
        super().__init__(allow_partial_load=False)
        self.ckpt = ckpt
        self.strict = strict
        self._values: dict[bytes, Any] = {}
        """Checked plain values by their bytes in the file."""

    def _strict_keys(self, keys: Any) -> list[str]:
        return sorted(k for k in keys if isinstance(k, str) and k.startswith(self.strict))

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        saved = self.metadata.state_dict_metadata
        missing = [k for k in self._strict_keys(self.state_dict) if k not in saved]
        if missing:
            raise CheckpointError(
                f"{self.ckpt}: lacks {_names(missing)} that this run's model/optimizer has: "
                f"the model config differs from the one that saved it (see its config.yaml)"
            )
        plan = super().create_local_plan()
        read = {item.dest_index.fqn for item in plan.items}
        # Keys held here whose local shard is empty read nothing; the coordinator must still
        # count them as held.
        plan.planner_data = [k for k in self._strict_keys(self.state_dict) if k not in read]
        return plan

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        assert self.metadata is not None
        held: set[str] = set()
        for plan in global_plan:
            held.update(item.dest_index.fqn for item in plan.items)
            held.update(plan.planner_data or ())
        extra = [k for k in self._strict_keys(self.metadata.state_dict_metadata) if k not in held]
        if extra:
            raise CheckpointError(
                f"{self.ckpt}: holds {_names(extra)} that this run's model/optimizer does not "
                f"have: the model config differs from the one that saved it (see its "
                f"config.yaml); nothing is loaded partially"
            )
        return super().create_global_plan(global_plan)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        raw = value.getvalue()
        obj = self._values.get(raw, _UNSEEN)
        if obj is _UNSEEN:  # the same bytes (an optimizer's hyper-parameters) parsed once
            obj = self._values[raw] = self._plain_value(fqn, raw)
        obj = copy.deepcopy(obj)  # no list or dict shared between entries
        # Where DCP's own load_bytes stores what it unpickles (without weights_only), this
        # stores the checked plain value itself.
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj

    def _plain_value(self, fqn: str, raw: bytes) -> Any:
        try:
            # torch.load would take a pickle that is not in a zip too; eurotrain (and DCP)
            # write only zips. Its pickle is checked not to nest deeper than a value can before
            # torch's unpickler hashes anything of it (see safe_pickle.nesting).
            if not torch.serialization._is_zipfile(io.BytesIO(raw)):
                raise Refused("is not a torch.save zip")
            nesting(torch._C.PyTorchFileReader(io.BytesIO(raw)).get_record("data.pkl"))
            obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as e:  # torch's refusal of a global, or garbage
            raise CheckpointError(
                f"{self.ckpt}: value {fqn!r} unreadable by torch.load(weights_only=True) "
                f"({_one_line(e, prefer='GLOBAL')}): the file is damaged or crafted"
            ) from None
        if not _plain(obj, [_PLAIN_ITEMS]):
            raise CheckpointError(
                f"{self.ckpt}: value {fqn!r} is a {type(obj).__name__}; eurotrain stores only "
                f"text and numbers there (the file may be crafted)"
            )
        return obj


def _plain(obj: Any, budget: list[int], depth: int = 0) -> bool:
    """Whether ``obj`` is text, numbers, and lists, tuples and str-keyed dicts of them, at most
    8 deep and of at most ``budget[0]`` items counted with repeats (a list shared at every
    level of a small file would otherwise take days to walk)."""
    budget[0] -= 1
    if budget[0] < 0:
        return False
    if type(obj) in _PLAIN:
        return True
    if depth > 8:
        return False
    if type(obj) in (list, tuple):
        return all(_plain(v, budget, depth + 1) for v in obj)
    if type(obj) is dict:
        return all(type(k) is str and _plain(v, budget, depth + 1) for k, v in obj.items())
    return False


def _names(keys: list[str]) -> str:
    """A few names per top-level key (model, optim), with counts: short enough for one line."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key.split(".", 1)[0], []).append(key)
    parts = []
    for names in groups.values():
        more = f" ... ({len(names)} in all)" if len(names) > _SHOWN else ""
        parts.append(", ".join(names[:_SHOWN]) + more)
    return "; ".join(parts)


def load_state(
    state: dict[str, Any],
    ckpt: Path,
    metadata: Metadata,
    strict: tuple[str, ...],
    process_group: dist.ProcessGroup | None = None,
) -> None:
    """dcp.load ``state`` in place from a verified checkpoint through the safe reader and
    planner. Every rank raises the same CheckpointError when any rank fails (DCP gathers the
    failures), naming the checkpoint and the first failure."""
    no_dist = not dist.is_initialized() or dist.get_world_size(process_group) == 1
    try:
        with warnings.catch_warnings():
            # One process: DCP's "assuming the intent is to load in a single process" is right.
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(
                state,
                storage_reader=SafeFileSystemReader(ckpt, metadata),
                planner=SafeLoadPlanner(ckpt, strict),
                process_group=process_group,
                no_dist=no_dist,
            )
    except CheckpointException as e:
        raise _load_error(ckpt, e) from None
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{ckpt}: loading failed: {_one_line(e)}") from e


def _load_error(ckpt: Path, e: CheckpointException) -> CheckpointError:
    failures = sorted(e.failures.items())
    for _, (exc, _trace) in failures:
        if isinstance(exc, CheckpointError):
            return CheckpointError(str(exc))
    if not failures:
        return CheckpointError(f"{ckpt}: loading failed ({_one_line(e)})")
    rank, (exc, _trace) = failures[0]
    return CheckpointError(
        f"{ckpt}: loading failed on rank {rank} ({_one_line(exc)}); the files may be damaged: "
        f"load it with checkpoint.verify full, or resume an older one (checkpoint.resume PATH)"
    )


def _one_line(e: BaseException, prefer: str = "") -> str:
    """The exception as one short line: its last line, or the first that holds ``prefer``."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    chosen = next((ln for ln in lines if prefer and prefer in ln), lines[-1] if lines else "")
    chosen = re.sub(r"\s+", " ", chosen)[:300]
    return f"{type(e).__name__}: {chosen}"
