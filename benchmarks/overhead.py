"""eurotrain's training step against a bare PyTorch loop on the same model and the same batches.

    python benchmarks/overhead.py [--steps 30] [--warmup 5] [CONFIG] [--section.key value ...]
    torchrun --nproc-per-node 2 benchmarks/overhead.py --parallel.dp_shard 2          # vs bare FSDP2
    torchrun --nproc-per-node 2 benchmarks/overhead.py --parallel.dp_replicate 2 \\
        --parallel.dp_shard 1                                                          # vs bare DDP
    torchrun --nproc-per-node 2 benchmarks/overhead.py --parallel.dp_shard 2 --bare ddp

Both run in the same process(es), one step each in turn (so both see the same load on a shared
machine), on the same global batch: eurotrain's step is what ``Trainer.train()`` runs per step
(the callbacks' on_step_start / on_step_end around ``train_step``, metrics synced at log steps);
the bare loop is what a user writes by hand: the same model (``build_model``, the same init),
fused AdamW, forward and backward per micro-batch (no gradient sync before the last), gradient
clipping and the update, wrapped in plain ``fully_shard`` per block (``--bare fsdp``), in
``DistributedDataParallel`` (``--bare ddp``) or nothing (one process). ``--bare`` defaults to the
one that matches the layout: ddp for replicas only, fsdp for other data-parallel layouts.

It prints the step time of each (min and median over the measured steps) and the ratios
eurotrain / bare: min over min and median over median (1.00 = no overhead). The default model
is configs/tiny.yaml widened (dim 256, 4 layers, seq_len 256, global batch 8, micro-batch 4);
any config and override can be given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eurotrain.config import load_config
from eurotrain.models.llama import build_model
from eurotrain.train import Trainer

DEFAULT = [
    "--model.dim", "256", "--model.ffn_dim", "768", "--model.num_layers", "4",
    "--model.max_seq_len", "256", "--data.seq_len", "256",
    "--train.global_batch_size", "8", "--train.micro_batch_size", "4",
    "--logging.log_interval", "10", "--logging.progress", "lines",
]  # fmt: skip


class BareLoop:
    """The hand-written loop: same model and optimizer settings, no framework."""

    def __init__(self, trainer: Trainer, kind: str) -> None:
        cfg = trainer.cfg
        device = trainer.dist.device
        model = build_model(cfg.model, "meta")
        if kind == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in model.layers.values():
                fully_shard(block)
            fully_shard(model)
        model.to_empty(device=device)
        model.tie_weights()
        model.init_weights(cfg.train.seed)
        if kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [device] if device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        self.model, self.kind, self.device = model, kind, device
        self.max_norm = cfg.train.grad_clip
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=True
        )
        self.autocast = trainer.engine.precision.context

    def step(self, batch: Any, num_tokens: float) -> None:
        last = len(batch.inputs) - 1
        for i, (x, y) in enumerate(zip(batch.inputs, batch.labels)):
            x, y = x.to(self.device), y.to(self.device)
            if self.kind == "fsdp":
                self.model.set_requires_gradient_sync(i == last)
            sync = self.model.no_sync() if self.kind == "ddp" and i < last else nullcontext()
            with sync, self.autocast():
                loss = self.model(x, y)
            with sync:
                (loss / num_tokens).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def eurotrain_step(trainer: Trainer, batch: Any) -> None:
    """One step as Trainer.train() runs it."""
    step = trainer.state.step + 1
    trainer.callbacks.call("on_step_start", trainer, step)
    metrics = trainer.train_step(batch)
    if trainer.is_log_step(trainer.state.step):
        trainer.sync_metrics()
    trainer.callbacks.call("on_step_end", trainer, trainer.state.step, metrics)


def _timed(fn: Any, cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="measured steps of each")
    ap.add_argument("--warmup", type=int, default=5, help="unmeasured steps of each first")
    ap.add_argument("--bare", choices=("auto", "none", "ddp", "fsdp"), default="auto")
    args, rest = ap.parse_known_args()
    config = rest.pop(0) if rest and not rest[0].startswith("--") else "configs/tiny.yaml"
    out = tempfile.mkdtemp(prefix="eurotrain-overhead-")
    total = args.warmup + args.steps
    cfg = load_config(
        config,
        [*DEFAULT, "--train.steps", str(total + 1), "--train.output_dir", out, *rest],
    )
    trainer = Trainer(cfg)
    world = trainer.dist.world_size
    kind = args.bare
    if kind == "auto":
        replicas_only = trainer.dims.dp_replicate == world > 1
        kind = "none" if world == 1 else "ddp" if replicas_only else "fsdp"
    bare = BareLoop(trainer, kind)
    cuda = trainer.dist.device.type == "cuda"
    ours, theirs = [], []
    for i in range(total):
        batch = next(trainer.loader)
        num_tokens = trainer.global_tokens(batch)
        a = _timed(lambda: eurotrain_step(trainer, batch), cuda)  # noqa: B023
        b = _timed(lambda: bare.step(batch, num_tokens), cuda)  # noqa: B023
        if i >= args.warmup:
            ours.append(a)
            theirs.append(b)
    if world > 1:  # a step is as slow as its slowest rank
        both = torch.tensor([ours, theirs], dtype=torch.float64)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        ours, theirs = both.tolist()
    if trainer.dist.is_main:
        layout = trainer.dims.describe()
        print(
            f"# overhead: eurotrain [{layout}] vs bare {kind} loop, {world} x "
            f"{trainer.dist.device.type}, {cfg.model.num_params() / 1e6:.1f}M params, "
            f"{args.steps} steps each (after {args.warmup}), torch {torch.__version__}"
        )
        print(f"command: {' '.join(sys.argv)} (world {world}; OMP_NUM_THREADS="
              f"{os.environ.get('OMP_NUM_THREADS', 'unset')})")  # fmt: skip
        for name, times in (("eurotrain", ours), ("bare", theirs)):
            print(f"{name:10s} step min {min(times) * 1e3:8.2f} ms, median "
                  f"{statistics.median(times) * 1e3:8.2f} ms")  # fmt: skip
        ratio_min = min(ours) / min(theirs)
        ratio_median = statistics.median(ours) / statistics.median(theirs)
        print(f"ratio eurotrain / bare: min {ratio_min:.3f} / median {ratio_median:.3f}")
    trainer.checkpointer.close()
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
