"""Reading checkpoints without trusting them: checksums from the commit marker, and DCP's
pickled ``.metadata`` read through an unpickler that only builds DCP's own metadata classes.

DCP stores its global metadata with plain ``pickle``; ``FileSystemReader.read_metadata`` would
unpickle whatever is there, so a crafted ``.metadata`` could run code. SafeFileSystemReader
replaces that one method: only the dataclasses of torch.distributed.checkpoint, torch.Size,
dtypes and a few builtins may be constructed. Tensor data and non-tensor values go through
DCP's own torch.load(weights_only=True).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from eurotrain.checkpoint.layout import CheckpointError, read_marker
from eurotrain.checkpoint.storage import checksum

_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
)
_BUILTINS = {"set", "frozenset", "slice", "tuple", "list", "dict", "int", "float", "str", "bytes"}
_TORCH = {"Size", "device", "strided", "sparse_coo", "contiguous_format", "preserve_format"}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            module in _DCP_MODULES
            or (module == "builtins" and name in _BUILTINS)
            or (module == "collections" and name == "OrderedDict")
            or (module == "pathlib" and name in ("PosixPath", "PurePosixPath"))
            or (module == "torch.serialization" and name == "_get_layout")  # name -> layout
            or (module == "torch" and (name in _TORCH or isinstance(getattr(torch, name, None), torch.dtype)))
        )  # fmt: skip
        if not allowed:
            raise pickle.UnpicklingError(
                f"DCP metadata refers to {module}.{name}, which a checkpoint's metadata never "
                f"needs: refusing to load it (the file may be crafted)"
            )
        return super().find_class(module, name)


def load_metadata(path: Path) -> Metadata:
    data = path.read_bytes()
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read DCP metadata ({e})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata is read by the restricted unpickler above."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError("per-rank DCP metadata (use_collectives=False) is not used here")
        metadata = load_metadata(Path(self.path) / ".metadata")
        storage_meta = getattr(metadata, "storage_meta", None)
        if storage_meta is None:
            storage_meta = metadata.storage_meta = StorageMeta()
        storage_meta.load_id = self.load_id
        return metadata


def verify_files(path: Path, names: list[str], marker: dict[str, Any], deep: bool) -> None:
    """Check the listed files against the marker: size always, blake2b when deep."""
    for name in names:
        want = marker["files"].get(name)
        file = path / name
        if want is None:
            raise CheckpointError(f"{file}: not listed in the commit marker")
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{file}: missing (listed in the commit marker)") from None
        if size != want["size"]:
            raise CheckpointError(
                f"{file}: {size} bytes, the commit marker says {want['size']} (truncated or "
                f"overwritten); use an older checkpoint (checkpoint.resume PATH)"
            )
        if deep and checksum(file) != want["blake2b"]:
            raise CheckpointError(
                f"{file}: blake2b checksum differs from the commit marker (corrupted on "
                f"disk); use an older checkpoint (checkpoint.resume PATH)"
            )


def verify(path: Path, mode: str, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Verify a committed checkpoint and return its marker. Every rank checks the marker, the
    sizes of all files and the checksum of ``.metadata``; with mode "full" the files' checksums
    are split across ranks."""
    marker = read_marker(path)
    if mode == "none":
        return marker
    names = sorted(marker["files"])
    verify_files(path, names, marker, deep=False)
    verify_files(path, [".metadata"], marker, deep=True)
    if mode == "full":
        verify_files(path, names[rank::world_size], marker, deep=True)
    return marker
