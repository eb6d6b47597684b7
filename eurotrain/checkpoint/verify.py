"""Checking a committed checkpoint before anything is loaded from it.

Every rank reads the commit marker and ``.metadata`` (the latter checksummed in memory, then
read by the restricted unpickler); the data files are split across ranks, balanced by size, and
each rank checks its share. Per ``checkpoint.verify``:

    full      (default) size and checksum (SHA-256) of every file: a flipped bit anywhere is caught
    metadata  size of every file, checksum of .metadata only: truncation is caught, bit rot not
    none      neither (the metadata is still read by the restricted unpickler)

The caller gathers every rank's verdict and decides collectively (checkpointer.py).
"""

from __future__ import annotations

import heapq
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata

from eurotrain.checkpoint.directory import read_marker
from eurotrain.checkpoint.safe_metadata import METADATA, read_metadata
from eurotrain.checkpoint.storage import checksum, entry_digest, link_error
from eurotrain.errors import CheckpointError

MODES = ("full", "metadata", "none")
_THREADS = 4
"""Files a rank checksums at once when its share holds several (hashlib and reads release
the GIL); a share is one file when as many ranks load as saved."""


def share(files: dict[str, Any], rank: int, world_size: int) -> list[str]:
    """This rank's share of the data files: largest first, each to the rank with the fewest
    bytes so far (ties: the lowest rank). The same on every rank, from the marker alone."""
    loads = [(0, r) for r in range(world_size)]
    mine = []
    for name in sorted((n for n in files if n != METADATA), key=lambda n: (-files[n]["size"], n)):
        load, r = heapq.heappop(loads)
        if r == rank:
            mine.append(name)
        heapq.heappush(loads, (load + files[name]["size"], r))
    return mine


def check_file(ckpt: Path, name: str, want: dict[str, Any], deep: bool) -> None:
    """One file against its marker entry: a regular file of that size, and its checksum if deep."""
    path = ckpt / name
    try:
        info = os.lstat(path)  # a link is not followed (to a file outside the checkpoint)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (listed in the commit marker)") from None
    if stat.S_ISLNK(info.st_mode):
        raise link_error(path)
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path}: not a regular file (the checkpoint may be crafted)")
    if info.st_size != want["size"]:
        raise CheckpointError(
            f"{path}: {info.st_size} bytes, the commit marker says {want['size']} (truncated "
            f"or overwritten); use an older checkpoint (checkpoint.resume PATH)"
        )
    if not deep:
        return
    algorithm, expected = entry_digest(want)
    if checksum(path, algorithm) != expected:
        raise CheckpointError(
            f"{path}: {algorithm} checksum differs from the commit marker (corrupted on disk); "
            f"use an older checkpoint (checkpoint.resume PATH)"
        )


def check_files(ckpt: Path, names: list[str], marker: dict[str, Any], deep: bool) -> None:
    """Several files, a few at a time; raises the error of the first failing name."""
    if len(names) <= 1 or not deep:
        for name in names:
            check_file(ckpt, name, marker["files"][name], deep)
        return
    with ThreadPoolExecutor(min(_THREADS, len(names)), thread_name_prefix="eurotrain-verify") as ex:
        futures = [ex.submit(check_file, ckpt, n, marker["files"][n], deep) for n in names]
        for future in futures:
            future.result()


def verify_checkpoint(
    ckpt: Path, mode: str, rank: int = 0, world_size: int = 1
) -> tuple[dict[str, Any], Metadata]:
    """This rank's part of verifying a committed checkpoint (all of it when world_size is 1);
    returns the marker and the safely read metadata, or raises CheckpointError."""
    if mode not in MODES:
        raise ValueError(f"verify mode {mode!r} is not one of {', '.join(MODES)}")
    marker = read_marker(ckpt)
    metadata = read_metadata(ckpt, marker, check_sum=mode != "none")
    if mode != "none":
        check_files(ckpt, share(marker["files"], rank, world_size), marker, mode == "full")
    return marker, metadata
