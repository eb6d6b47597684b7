"""Reading DCP's ``.metadata`` without trusting it, and checking that what it describes is what
the checkpoint's files hold.

``read_metadata`` checks the file against the commit marker (a regular file, its size and
checksum), reads it with the restricted unpickler of ``safe_pickle.py``, and refuses metadata
whose storage entries point outside the data files the marker lists, claim more bytes than
those hold, or whose tensors' chunks do not tile them exactly (a gap would load part of a
tensor without an error). The readers (``safe_reader.py``) then trust its shapes, offsets and
lengths.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from eurotrain.checkpoint.safe_pickle import Refused, unpickle_metadata
from eurotrain.checkpoint.storage import MAX_SMALL_FILE, digest, entry_digest, read_small
from eurotrain.errors import CheckpointError, shown

METADATA = ".metadata"
_OVERLAP_CHECKS = 10_000_000
"""Most pairs of chunks compared for overlap per tensor."""


def read_metadata(ckpt: Path, marker: dict[str, Any], check_sum: bool = True) -> Metadata:
    """The DCP metadata of a checkpoint, checked against its commit marker and read by the
    restricted unpickler; CheckpointError naming the file and what is wrong."""
    path = ckpt / METADATA
    want = marker["files"].get(METADATA)
    if want is None:
        raise CheckpointError(f"{path}: not listed in the commit marker")
    try:
        data = read_small(path, want["size"] if check_sum else MAX_SMALL_FILE)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (listed in the commit marker)") from None
    algorithm, expected = entry_digest(want)
    if check_sum and (len(data) != want["size"] or digest(data, algorithm) != expected):
        raise CheckpointError(
            f"{path}: {len(data)} bytes whose {algorithm} differs from the commit marker's "
            f"({want['size']} bytes): corrupted or replaced; use an older checkpoint"
        )
    try:
        metadata = unpickle_metadata(data)
    except Refused as e:
        raise CheckpointError(
            f"{path}: {e}, which eurotrain's checkpoint metadata never holds: refusing to "
            f"load it (the file may be crafted); use a checkpoint from a source you trust"
        ) from None
    except Exception as e:  # garbage: any error the pickle machine raises on malformed input
        raise CheckpointError(
            f"{path}: not readable DCP metadata ({type(e).__name__}: {e})"
        ) from None
    try:
        problem = metadata_problem(metadata, marker["files"])
    except RecursionError:  # a value nested deeper than Python compares or prints
        problem = "holds values nested too deep"
    if problem:
        raise CheckpointError(f"{path}: {problem} (the file may be crafted)")
    return metadata


def metadata_problem(metadata: Metadata, files: dict[str, Any]) -> str:
    """What in the (already safely built) metadata would make DCP read outside the checkpoint's
    own data files or misbehave; empty when nothing."""
    entries = getattr(metadata, "state_dict_metadata", None)
    storage = getattr(metadata, "storage_data", None)
    if type(entries) is not dict or type(storage) is not dict:
        return "state_dict_metadata or storage_data is not a dict"
    for key, value in entries.items():
        if type(key) is not str or type(value) not in (TensorStorageMetadata, BytesStorageMetadata):
            return f"entry {shown(key)} is not a tensor or bytes entry"
        if type(value) is TensorStorageMetadata and not _tensor_entry_ok(value):
            return f"tensor entry {shown(key)} has a malformed dtype, size or chunk"
    for index, info in storage.items():
        if type(index) is not MetadataIndex or type(index.fqn) is not str:
            return f"storage entry {shown(index)} is malformed"
        if type(info) is not _StorageInfo:
            return f"storage entry {shown(index)} is malformed"
        name, offset, length = info.relative_path, info.offset, info.length
        if type(name) is not str or not name.endswith(".distcp") or name not in files:
            return f"storage entry {shown(index.fqn)} points to {shown(name)}, not a data file"
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
            return f"storage entry {shown(index.fqn)} has a bad offset/length"
        if offset + length > files[name]["size"]:
            return f"storage entry {shown(index.fqn)} reaches past the end of {name}"
        if getattr(info, "transform_descriptors", None):
            return f"storage entry {shown(index.fqn)} asks for stream transforms"
        if index.fqn not in entries:
            return f"storage entry {shown(index.fqn)} has no state_dict_metadata entry"
    # Each tensor chunk is stored, with room for its bytes, and no byte is claimed twice: what
    # the metadata says it holds is at most what the data files hold (convert allocates it).
    stored = {
        (index.fqn, tuple(index.offset or ())): info.length for index, info in storage.items()
    }
    data_bytes = sum(f["size"] for name, f in files.items() if name.endswith(".distcp"))
    if sum(stored.values()) > data_bytes:
        return "storage entries claim more bytes than the data files hold"
    for key, value in entries.items():
        if type(value) is not TensorStorageMetadata:
            continue
        for c in value.chunks:
            room = stored.get((key, tuple(c.offsets)))
            if room is None:
                return f"tensor entry {shown(key)} has a chunk at {tuple(c.offsets)} not stored"
            if math.prod(c.sizes) * value.properties.dtype.itemsize > room:
                return f"tensor entry {shown(key)} has a chunk larger than its stored bytes"
    return ""


def _tensor_entry_ok(entry: TensorStorageMetadata) -> bool:
    properties, size, chunks = entry.properties, entry.size, entry.chunks
    if type(properties) is not TensorProperties or not isinstance(properties.dtype, torch.dtype):
        return False
    if type(size) is not torch.Size or type(chunks) is not list or min(size, default=0) < 0:
        return False
    return all(
        type(c) is ChunkStorageMetadata
        and type(c.offsets) is torch.Size
        and type(c.sizes) is torch.Size
        and len(c.offsets) == len(c.sizes) == len(size)
        for c in chunks
    ) and _tiles(size, chunks)


def _tiles(size: torch.Size, chunks: list[ChunkStorageMetadata]) -> bool:
    """Whether the chunks lie inside the tensor and cover it exactly once: a tensor whose
    chunks leave a gap would load partly (the rest keeping whatever the target held) without
    an error. Inside and with volumes that sum to the tensor's, no overlap means no gap."""
    volume = 0
    for c in chunks:
        if any(o < 0 or n < 0 or o + n > d for o, n, d in zip(c.offsets, c.sizes, size)):
            return False
        volume += math.prod(c.sizes)
    if volume != math.prod(size):
        return False
    boxes = [c for c in chunks if math.prod(c.sizes) > 0]
    if len(boxes) < 2:
        return True
    # Sweep along the dimension the chunks are split most along (FSDP's dim 0, say): only
    # chunks whose ranges there meet are compared.
    dim = max(range(len(size)), key=lambda d: len({c.offsets[d] for c in boxes}))
    boxes.sort(key=lambda c: c.offsets[dim])
    budget = _OVERLAP_CHECKS
    for i, a in enumerate(boxes):
        end = a.offsets[dim] + a.sizes[dim]
        for b in boxes[i + 1 :]:
            if b.offsets[dim] >= end:
                break
            budget -= 1
            if budget < 0:  # only a crafted file gets here
                return False
            if all(
                bo < ao + an and ao < bo + bn
                for ao, an, bo, bn in zip(a.offsets, a.sizes, b.offsets, b.sizes)
            ):
                return False
    return True
