"""Checkpoint bandwidth and training stall, against the file system's raw write speed.

    python benchmarks/checkpoint.py --params 1e9 --dir /scratch/me/bench [--steps 6]

One process, fp32 model of --params parameters split into 64 tensors (plus nothing else, so
bytes = 4 x params). It measures, on --dir:
  * dd-style: the same bytes written in 64 MiB blocks to one file, fsynced (the ceiling);
  * save: eurotrain's sync save (DCP write + fsync + blake2b + commit) -> GB/s, ratio to dd;
  * verify: checkpoint.verify metadata, and full (blake2b of every file; one rank does all)
    -> s/GB, with the page cache dropped first when --cold (needs root) or warm otherwise;
  * load: DCP load through the safe reader into preallocated tensors -> GB/s (cache warm);
  * stall: training steps (a matmul loop of fixed length) with a save at step 1, sync vs async:
    the extra time the loop sees, and the ratio async/sync.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eurotrain.checkpoint import CheckpointConfig, Checkpointer
from eurotrain.checkpoint.safe_reader import load_state
from eurotrain.checkpoint.storage import checksum, detect_fs
from eurotrain.checkpoint.verify import verify_checkpoint
from eurotrain.parallel.engine import ModelState, OptimizerState
from eurotrain.state import RNGState, Stateful, TrainState


class Blob(nn.Module):
    def __init__(self, params: int, num: int = 64) -> None:
        super().__init__()
        each = params // num
        self.ws = nn.ParameterList(nn.Parameter(torch.randn(each)) for _ in range(num))


def dd(path: Path, nbytes: int, block: int = 64 << 20) -> float:
    buf = os.urandom(block)
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    left = nbytes
    while left > 0:
        left -= os.write(fd, buf[: min(block, left)])
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - start


def checkpoint_parts(model: nn.Module) -> dict[str, Stateful]:
    """What a trainer hands the checkpointer, around a bare model and an optimizer without
    state (SGD without momentum: the bytes are the model's)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return {
        "model": ModelState(model),
        "optim": OptimizerState(model, opt),
        "train": TrainState(),
        "scheduler": sched,
        "rng": RNGState(),
    }


INFO = {"tokens_seen": 0, "layout": {"dp_shard": 1}, "config_yaml": "bench: true\n"}


def drop_page_cache() -> bool:
    """Make the next reads come from the disk (root only); whether it worked."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return False
    return True


def run_steps(parts, ck, steps: int, save_at: int, sync: bool, work: torch.Tensor) -> float:
    start = time.perf_counter()
    for step in range(1, steps + 1):
        for _ in range(8):
            work @ work  # a fixed amount of compute per step
        if step == save_at:
            ck.save(step, parts, INFO, sync=sync)
    loop = time.perf_counter() - start  # what training sees; an async write may go on
    ck.wait()
    return loop


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=2.5e8)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before verifying")
    args = ap.parse_args()
    params = int(args.params)
    nbytes = params * 4
    work_dir = Path(tempfile.mkdtemp(prefix="eurotrain-ckpt-bench-", dir=args.dir))
    try:
        model = Blob(params)
        dd_s = dd(work_dir / "dd.bin", nbytes)
        t0 = time.perf_counter()
        checksum(work_dir / "dd.bin")
        sum_s = time.perf_counter() - t0
        (work_dir / "dd.bin").unlink()

        cfg = CheckpointConfig(dir=str(work_dir / "ck"), interval=1, keep_last=1)
        parts = checkpoint_parts(model)
        ck = Checkpointer(cfg, Path(cfg.dir), 0, 1, log=lambda m: None)
        t0 = time.perf_counter()
        ck.save(1, parts, INFO, sync=True)
        save_s = time.perf_counter() - t0

        ckpt = work_dir / "ck" / "step-000001"
        target = {"model": {k: torch.empty_like(v) for k, v in model.state_dict().items()}}
        cold = args.cold and drop_page_cache()
        t0 = time.perf_counter()
        verify_checkpoint(ckpt, "metadata")
        meta_s = time.perf_counter() - t0
        cold = args.cold and drop_page_cache()
        t0 = time.perf_counter()
        _, metadata = verify_checkpoint(ckpt, "full")
        full_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_state(target, ckpt, metadata, ("model.",))
        load_s = time.perf_counter() - t0

        work = torch.randn(512, 512)
        ck.last_saved_step = -1
        base = run_steps(parts, ck, args.steps, save_at=-1, sync=True, work=work)
        ck.last_saved_step = -1
        sync_s = run_steps(parts, ck, args.steps, save_at=2, sync=True, work=work)
        ck.last_saved_step = -1
        # async: only the staging copy stalls the loop; the write overlaps later steps.
        async_loop = run_steps(parts, ck, args.steps, save_at=2, sync=False, work=work)
        ck.close()
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    gb = nbytes / 1e9
    stall_sync, stall_async = max(sync_s - base, 1e-9), max(async_loop - base, 1e-9)
    print(f"# Checkpoint benchmark {date.today()} on {platform.node()} ({os.cpu_count()} cores)")
    cmd = f"--params {args.params:g} --dir {args.dir} --steps {args.steps}"
    print(f"command: python benchmarks/checkpoint.py {cmd}" + (" --cold" if args.cold else ""))
    print(f"file system: {detect_fs(args.dir).describe()}; {gb:.2f} GB of fp32 weights")
    print(f"dd write+fsync      {gb / dd_s:6.2f} GB/s ({dd_s:.2f} s)")
    print(f"blake2b of the file {gb / sum_s:6.2f} GB/s ({sum_s:.2f} s)")
    print(f"save (sync, commit) {gb / save_s:6.2f} GB/s ({save_s:.2f} s), {dd_s / save_s:.2f} x dd")
    cache = "page cache dropped" if cold else "page cache warm"
    print(f"verify metadata     {meta_s / gb:6.2f} s/GB ({meta_s:.2f} s, {cache})")
    print(f"verify full         {full_s / gb:6.2f} s/GB ({full_s:.2f} s, {cache}, one rank)")
    print(f"load (DCP, safe)    {gb / load_s:6.2f} GB/s ({load_s:.2f} s, page cache warm)")
    print(
        f"stall over {args.steps} steps ({base:.2f} s without saving): sync +{stall_sync:.2f} s,"
        f" async +{stall_async:.2f} s (loop only; ratio async/sync {stall_async / stall_sync:.2f})"
    )


if __name__ == "__main__":
    main()
