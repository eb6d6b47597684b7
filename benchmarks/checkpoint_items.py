"""The per-item cost of a save and a load, against DCP's own writer and reader and against
torch.save for every item.

    python benchmarks/checkpoint_items.py [--layers 16 32 80] [--runs 5] [--dir DIR]
        [--gc scheduled|auto] [--loop-s 3]

A model's checkpoint holds thousands of items: each block's nine weights, AdamW's three tensors
of state per weight and, in the flattened optimizer state, its eleven hyper-parameters (twelve
with an LR scheduler; none here) for every weight again. Their Python cost (DCP's planning, a
torch.save each, the metadata) runs on the checkpoint thread, under the GIL that the training
loop needs to launch its work. This measures
it apart from the bytes: for each --layers, a Llama of that depth with tiny widths (dim 64; the
items are those of a real model of that depth, the bytes negligible), after one AdamW step, in
one process. --runs times, the three alternating (a new step or directory each time):
  * eurotrain: ``Checkpointer`` sync save (writer process, commit), as configured by default;
  * eurotrain, torch.save for every item: the same without the per-save shortcuts (each
    distinct plain value serialized once, tensors of one kind replayed around their data;
    eurotrain/checkpoint/writer.py), as before them;
  * DCP: ``dcp.save`` with its ``FileSystemWriter`` (one thread, fsync), what torchtitan runs.
Python's garbage collector is as the trainer leaves it (``--gc scheduled``, train.gc_interval
> 0: automatic collection off, the young generations collected between the measurements) or
automatic (``--gc auto``, train.gc_interval 0), for all three alike. Then the async save beside
a stand-in for a launch-bound trainer (a loop of small tensor ops, each needing the GIL,
--loop-s seconds alone), with and without the shortcuts, alternating: the time inside
``save()`` and how much longer the loop takes than alone (the mean of the loop just before and
just after): the GIL and the cores the save takes from it. Last, loads of the model and
optimizer from the newest checkpoint (in the page cache), alternating: eurotrain's safe reader
and planner (tensors read straight into place, each distinct value unpickled once) against
DCP's FileSystemReader and default planner (torch.load of every item).
It prints the medians and the ratios to each baseline.

    python benchmarks/checkpoint_items.py --trainer [--layers 48] [--runs 4] [--dir DIR]

The same in the real trainer (``Trainer.train()``, one process on the CPU, the model above with
the demo corpus, global batch 8 of 32 tokens): 41 steps with an async save every 4 steps, the
loop's time over steps 6-41 (9 saves), for four configurations in rotating order each round:
as now; every item through torch.save with the collector automatic (as before both changes); no
saves; as now with the collector automatic (``train.gc_interval: 0``). Each save's cost to the
loop is the difference to the run without saves, divided by 9.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eurotrain.checkpoint import CheckpointConfig, Checkpointer, writer
from eurotrain.checkpoint.safe_reader import load_state
from eurotrain.checkpoint.state import build_state
from eurotrain.checkpoint.verify import verify_checkpoint
from eurotrain.config import ModelConfig, config_from_dict
from eurotrain.models.llama import build_model
from eurotrain.optim import OptimConfig, build_optimizer
from eurotrain.parallel.engine import ModelState, OptimizerState
from eurotrain.state import RNGState, Stateful, TrainState

INFO = {"tokens_seen": 0, "layout": {"dp_shard": 1}, "config_yaml": "bench: true\n"}


@contextlib.contextmanager
def every_item_through_torch_save() -> Iterator[None]:
    """The save as it was before the per-save shortcuts: each item its own torch.save."""
    save_tensor, transform = writer.Recorder.save_tensor, writer.CachingPlanner.transform_object
    writer.Recorder.save_tensor = lambda self, t: torch.save(t, self)  # type: ignore[method-assign]
    writer.CachingPlanner.transform_object = DefaultSavePlanner.transform_object  # type: ignore[method-assign]
    try:
        yield
    finally:
        writer.Recorder.save_tensor = save_tensor  # type: ignore[method-assign]
        writer.CachingPlanner.transform_object = transform  # type: ignore[method-assign]


def parts_for(layers: int) -> tuple[dict[str, Stateful], int]:
    cfg = ModelConfig(name=f"items-{layers}", vocab_size=320, dim=64, num_layers=layers,
                      num_heads=4, num_kv_heads=2, ffn_dim=128, max_seq_len=64)  # fmt: skip
    model = build_model(cfg, "cpu")
    opt = build_optimizer(model, OptimConfig())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # AdamW's state exists, as in training
    parts: dict[str, Stateful] = {
        "model": ModelState(model),
        "optim": OptimizerState(model, opt),
        "train": TrainState(),
        "rng": RNGState(),
    }
    return parts, len(list(model.parameters()))


def count_items(parts: dict[str, Stateful]) -> int:
    planner = DefaultSavePlanner()
    planner.set_up_planner(build_state(parts, 0), is_coordinator=True)
    return len(planner.create_local_plan().items)


def header(title: str, options: str) -> None:
    print(f"# {title} {date.today()} on {platform.node()} ({os.cpu_count()} cores)")
    print(f"command: python benchmarks/checkpoint_items.py {options}")


def launch_bound_loop(iterations: int) -> float:
    x = torch.ones(64)
    start = time.perf_counter()
    for _ in range(iterations):
        x = x.add(1e-7)
    return time.perf_counter() - start


TRAINER_KINDS = {  # name: (train.gc_interval, every item through torch.save, saves)
    "eurotrain": (50, False, True),
    "before (torch.save each, gc automatic)": (0, True, True),
    "no saves": (50, False, False),
    "eurotrain, gc automatic": (0, False, True),
}


class StepEnds:
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, trainer: object, step: int, metrics: object) -> None:
        self.times.append(time.perf_counter())


def trainer_loop(work: Path, name: str, layers: int, kind: str) -> float:
    """Seconds of steps 6-41 of a 41-step run of ``kind``."""
    from eurotrain.train import Trainer

    gc_interval, old, saves = TRAINER_KINDS[kind]
    cfg = config_from_dict({
        "model": {"name": "items", "vocab_size": 320, "dim": 64, "num_layers": layers,
                  "num_heads": 4, "num_kv_heads": 2, "ffn_dim": 192, "max_seq_len": 64},
        "data": {"corpus": "demo", "tokenizer": "byte", "seq_len": 32, "demo_bytes": 200_000},
        "train": {"steps": 41, "global_batch_size": 8, "micro_batch_size": 2, "device": "cpu",
                  "output_dir": str(work), "run_name": name, "gc_interval": gc_interval},
        "checkpoint": {"interval": 4 if saves else 1000, "keep_last": 1},
        "logging": {"log_interval": 50},
    })  # fmt: skip
    ends = StepEnds()
    with every_item_through_torch_save() if old else contextlib.nullcontext():
        Trainer(cfg, callbacks=[ends]).train()
    return ends.times[-1] - ends.times[4]


def trainer_main(args: argparse.Namespace, layers: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="eurotrain-ckpt-items-", dir=args.dir))
    totals: dict[str, list[float]] = {kind: [] for kind in TRAINER_KINDS}
    try:
        kinds = list(TRAINER_KINDS)
        for run in range(args.runs):
            for kind in kinds[run % 4 :] + kinds[: run % 4]:
                totals[kind].append(
                    trainer_loop(work, f"run{run}-{kinds.index(kind)}", layers, kind)
                )
                print(f"run {run + 1}: {kind}: {totals[kind][-1]:.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = statistics.median
    header("Checkpoint items in the trainer",
           f"--trainer --layers {layers} --runs {args.runs} --dir {args.dir}")  # fmt: skip
    bare = med(totals["no saves"])
    for kind, values in totals.items():
        per_save = "" if kind == "no saves" else f", {(med(values) - bare) / 9:.2f} s per save"
        print(
            f"{kind:40s} steps 6-41: median {med(values):.2f} s ("
            + ", ".join(f"{v:.2f}" for v in values)
            + f"){per_save}"
        )


def time_loads(
    ckpt: Path, parts: dict[str, Stateful], runs: int, between: Callable[[], None]
) -> dict[str, list[float]]:
    """Seconds to load the model and optimizer from ``ckpt`` (in the page cache), alternating:
    eurotrain's safe reader and planner, and DCP's FileSystemReader and default planner."""
    _, metadata = verify_checkpoint(ckpt, "metadata")
    state = {k: parts[k].state_dict() for k in ("model", "optim")}
    times: dict[str, list[float]] = {"eurotrain": [], "dcp": []}
    for _ in range(runs):
        for kind in times:
            t0 = time.perf_counter()
            if kind == "eurotrain":
                load_state(state, ckpt, metadata, ("model.", "optim."))
            else:
                dcp.load(state, storage_reader=FileSystemReader(ckpt), no_dist=True)
            times[kind].append(time.perf_counter() - t0)
            between()
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", help="default 16 32 80; 48 with --trainer")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--gc", choices=["scheduled", "auto"], default="scheduled")
    ap.add_argument("--trainer", action="store_true", help="in the real trainer (see above)")
    ap.add_argument("--loop-s", type=float, default=3.0, help="the stand-in trainer's seconds")
    args = ap.parse_args()
    if args.trainer:
        trainer_main(args, (args.layers or [48])[0])
        return
    args.layers = args.layers or [16, 32, 80]
    if args.gc == "scheduled":
        gc.collect()
        gc.disable()

    def between() -> None:  # where the trainer's schedule would collect
        if args.gc == "scheduled":
            gc.collect(1)

    work = Path(tempfile.mkdtemp(prefix="eurotrain-ckpt-items-", dir=args.dir))
    rows = []
    try:
        # The stand-in trainer: as many small ops as take --loop-s alone (longer than a save).
        per_op = launch_bound_loop(50_000) / 50_000
        iterations = max(1, int(args.loop_s / per_op))
        for layers in args.layers:
            parts, params = parts_for(layers)
            items = count_items(parts)
            cfg = CheckpointConfig(dir=str(work / f"ck{layers}"), interval=1, keep_last=1)
            ck = Checkpointer(cfg, Path(cfg.dir), 0, 1, log=lambda m: None)
            ck.save(1, parts, INFO, sync=True)  # starts the writer, maps the buffer
            times: dict[str, list[float]] = {"eurotrain": [], "torch.save each": [], "dcp": []}
            step = 2
            for run in range(args.runs):
                for kind in times:
                    t0 = time.perf_counter()
                    if kind == "dcp":
                        target = work / f"dcp{layers}-{run}"
                        state = build_state(parts, 0)
                        dcp.save(state, storage_writer=FileSystemWriter(target), no_dist=True)
                    elif kind == "eurotrain":
                        ck.save(step, parts, INFO, sync=True)
                    else:
                        with every_item_through_torch_save():
                            ck.save(step, parts, INFO, sync=True)
                    times[kind].append(time.perf_counter() - t0)
                    ck.wait()  # the retention of the previous step, untimed
                    between()
                    step += 1
                    if kind == "dcp":
                        shutil.rmtree(target)
            stall: dict[str, list[tuple[float, float]]] = {"eurotrain": [], "torch.save each": []}
            for _ in range(args.runs):
                for kind in stall:
                    before = launch_bound_loop(iterations)
                    baseline = every_item_through_torch_save() if kind != "eurotrain" else None
                    with baseline or contextlib.nullcontext():
                        t0 = time.perf_counter()
                        ck.save(step, parts, INFO, sync=False)
                        call = time.perf_counter() - t0
                        ck.wait_staged()
                        beside = launch_bound_loop(iterations)
                        ck.wait()
                    after = launch_bound_loop(iterations)  # alone: the mean of before and after
                    step += 1
                    stall[kind].append((call, beside - (before + after) / 2))
                    between()
            ck.close()
            loads = time_loads(Path(cfg.dir) / f"step-{step - 1:06d}", parts, args.runs, between)
            rows.append((layers, params, items, times, stall, iterations * per_op, loads))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    layers_arg = " ".join(map(str, args.layers))
    header("Checkpoint items benchmark",
           f"--layers {layers_arg} --runs {args.runs} --dir {args.dir} --gc {args.gc} "
           f"--loop-s {args.loop_s}")  # fmt: skip
    for layers, params, items, times, stall, loop_s, loads in rows:
        e, t, d = (med(times[k]) for k in ("eurotrain", "torch.save each", "dcp"))
        print(f"{layers} layers: {params} parameters, {items} items")
        for kind, values in times.items():
            print(f"  sync save, {kind:16s} " + ", ".join(f"{v:.2f}" for v in values) + " s")
        print(f"  median: eurotrain {e:.2f} s = {e / t:.2f} x torch.save for every item "
              f"({t:.2f} s), {e / d:.2f} x DCP's FileSystemWriter ({d:.2f} s)")  # fmt: skip
        for kind, values in stall.items():
            calls = ", ".join(f"{c:.3f}" for c, _ in values)
            extra = ", ".join(f"{s:+.2f}" for _, s in values)
            print(f"  async, {kind:16s} save() {calls} s; a {loop_s:.1f} s launch-bound loop "
                  f"{extra} s")  # fmt: skip
        se, st = (med(s for _, s in stall[k]) for k in ("eurotrain", "torch.save each"))
        print(f"  median loop stall: eurotrain {se:.2f} s, torch.save for every item {st:.2f} s")
        for kind, values in loads.items():
            print(f"  load, {kind:17s} " + ", ".join(f"{v:.2f}" for v in values) + " s")
        le, ld = (med(loads[k]) for k in ("eurotrain", "dcp"))
        print(f"  median load: eurotrain {le:.2f} s = {ld / le:.2f} x as fast as DCP's "
              f"FileSystemReader ({ld:.2f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
