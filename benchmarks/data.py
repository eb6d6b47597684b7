"""Data pipeline throughput: preparation (tokens/s per worker) and serving (tokens/s/process).

Serving reads shuffled packed sequences from prepared memory-mapped shards through the
trainer's GlobalBatchLoader, against reading the same sequences (same shuffled order, same
batches) from a `datasets` dataset in torch format, in one run.

    python benchmarks/data.py [--text-mb 64] [--seq-len 2048] [--workers 2] [--tokenizer byte]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eurotrain.data import GlobalBatchLoader, PreparedDataset, PreparedSequences
from eurotrain.data.prepare import prepare


def make_corpus(folder: Path, megabytes: float) -> None:
    """Multilingual-ish random text in 1,000 files (one document each)."""
    rng = np.random.default_rng(0)
    text = (
        "der Zug fährt über die Brücke la niña mange une crème brûlée à Zürich łódź żółw "
        "Ελληνικά γλώσσα суперкомпьютер the data loader serves packed sequences"
    )
    words = np.array(text.split())
    folder.mkdir(parents=True)
    per_file = int(megabytes * 2**20 / 1000)
    for i in range(1000):
        text = " ".join(rng.choice(words, per_file // 7))
        (folder / f"{i:04d}.txt").write_text(text, encoding="utf-8")


def serve_loader(loader: GlobalBatchLoader, steps: int) -> float:
    next(loader)  # warm the permutation and page cache
    start = time.perf_counter()
    tokens = 0
    for _ in range(steps):
        batch = next(loader)
        tokens += sum(x.numel() for x in batch.inputs)
    return tokens / (time.perf_counter() - start)


def serve_datasets(source: PreparedSequences, loader: GlobalBatchLoader, steps: int) -> float:
    """The same rows, stored as a `datasets` column and read back by shuffled index batches."""
    import datasets
    import torch

    rows = source.gather(np.arange(len(source)))
    ds = datasets.Dataset.from_dict({"ids": list(rows)}).with_format("torch")
    micro = loader.micro_batch
    loader.step = 1
    start = time.perf_counter()
    tokens = 0
    for _ in range(steps):
        _, idx = loader.global_indices(loader.step)
        loader.step += 1
        t = ds[idx.tolist()]["ids"].to(torch.int64)
        inputs = list(t[:, :-1].split(micro))
        tokens += sum(x.numel() for x in inputs)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text-mb", type=float, default=64)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tokenizer", default="byte")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        make_corpus(Path(tmp) / "in", args.text_mb)
        start = time.perf_counter()
        prepare(str(Path(tmp) / "in"), args.tokenizer, f"{tmp}/out", workers=args.workers,
                shard_size_mb=16)  # fmt: skip
        prep_s = time.perf_counter() - start
        ds = PreparedDataset(f"{tmp}/out")
        source = PreparedSequences(ds, args.seq_len)
        results = {}
        for seq_len in sorted({128, args.seq_len}):
            src = PreparedSequences(ds, seq_len)
            gb = args.global_batch * args.seq_len // seq_len
            loader = GlobalBatchLoader(src, gb, 8, 0, 1, seed=0)
            results[seq_len] = serve_loader(loader, args.steps)
        loader = GlobalBatchLoader(source, args.global_batch, 8, 0, 1, seed=0)
        ours = serve_loader(loader, args.steps)
        theirs = serve_datasets(source, GlobalBatchLoader(source, args.global_batch, 8, 0, 1, 0),
                                min(args.steps, 50))  # fmt: skip
    print(f"date {date.today()} | {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores | python {platform.python_version()}")  # fmt: skip
    print(f"prepare: {ds.num_tokens:,} tokens ({args.tokenizer}) in {prep_s:.1f} s with "
          f"{args.workers} workers = {ds.num_tokens / prep_s / args.workers:,.0f} tokens/s "
          f"per worker (incl. datasets load + pool start-up)")  # fmt: skip
    for seq_len, rate in results.items():
        print(f"loader (mmap shards), seq_len {seq_len}: {rate / 1e6:,.1f} M tokens/s")
    print(f"loader seq_len {args.seq_len}: {ours / 1e6:,.1f} M tokens/s vs datasets "
          f"(torch format, same rows/order): {theirs / 1e6:,.1f} M tokens/s -> "
          f"ratio {ours / theirs:,.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
