"""Reading a large DCP ``.metadata`` without trusting it, against plain ``pickle.loads``.

    python benchmarks/checkpoint_metadata.py [--tensors 900] [--ranks 256] [--runs 2]

Builds the metadata of a checkpoint of --tensors 4096 x 1024 fp32 tensors, each split into
--ranks row chunks (FSDP's layout: one storage entry per tensor and rank), pickles it as DCP
does (protocol 4), and times, --runs times: C pickle.loads (the baseline: what DCP itself
does), eurotrain's restricted unpickler (safe_pickle.unpickle_metadata), and the checks of what
the metadata describes (safe_metadata.metadata_problem: entries inside the listed files, chunks
tiling each tensor, bytes claimed against the files). Prints each figure and the ratio of the
safe read (unpickler + checks) to pickle.loads.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eurotrain.checkpoint.safe_metadata import metadata_problem
from eurotrain.checkpoint.safe_pickle import unpickle_metadata

ROWS, COLS = 4096, 1024


def build(tensors: int, ranks: int) -> tuple[bytes, dict[str, dict[str, int]]]:
    """The pickled metadata and the marker's file sizes it must fit."""
    entries, storage, ends = {}, {}, [0] * ranks
    rows = ROWS // ranks
    for t in range(tensors):
        key = f"model.layers.{t}.weight"
        chunks = []
        for r in range(ranks):
            offsets = torch.Size((r * rows, 0))
            chunks.append(ChunkStorageMetadata(offsets, torch.Size((rows, COLS))))
            length = rows * COLS * 4 + 1024  # the data and torch.save's bytes around it
            storage[MetadataIndex(key, offsets)] = _StorageInfo(f"__{r}_0.distcp", ends[r], length)
            ends[r] += length
        properties = TensorProperties(dtype=torch.float32)
        entries[key] = TensorStorageMetadata(properties, torch.Size((ROWS, COLS)), chunks)
    files = {f"__{r}_0.distcp": {"size": end} for r, end in enumerate(ends)}
    return pickle.dumps(Metadata(entries, None, storage), protocol=4), files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensors", type=int, default=900)
    ap.add_argument("--ranks", type=int, default=256)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    if args.ranks < 1 or ROWS % args.ranks:
        ap.error(f"--ranks {args.ranks} must divide {ROWS}")
    data, files = build(args.tensors, args.ranks)
    print(f"{len(data) / 1e6:.1f} MB of .metadata, {args.tensors * args.ranks} storage entries")
    for run in range(args.runs):
        t0 = time.perf_counter()
        pickle.loads(data)  # our own bytes: the baseline
        t1 = time.perf_counter()
        metadata = unpickle_metadata(data)
        t2 = time.perf_counter()
        problem = metadata_problem(metadata, files)
        t3 = time.perf_counter()
        assert not problem, problem
        print(
            f"run {run + 1}: pickle.loads {t1 - t0:.2f} s; restricted unpickler {t2 - t1:.2f} s "
            f"+ checks {t3 - t2:.2f} s = {(t3 - t1) / (t1 - t0):.2f}x pickle.loads"
        )


if __name__ == "__main__":
    main()
