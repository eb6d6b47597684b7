"""Checkpoint bandwidth and training stall, against the file system's raw write speed.

    python benchmarks/checkpoint.py --params 1e9 --dir /scratch/me/bench [--steps 6] [--runs 3]
        [--direct-io never|sync|always]

One process, fp32 model of --params parameters split into 64 tensors (plus nothing else, so
bytes = 4 x params). It measures, on --dir, --runs times (dd and save alternating, so that both
see the same load on a shared machine), and prints each figure and the min / median of the
ratios:
  * dd-style: the same bytes written in 64 MiB blocks to a new file, fsynced (the ceiling;
    the previous file is deleted outside the timing); dd and the save take turns going first;
  * save: eurotrain's sync save of a new step (staging, DCP write, SHA-256 while writing,
    fsync, commit), until it returns; through the page cache, or with O_DIRECT where
    --direct-io is sync or always (the async saves of the stall below: always); the retention
    that then deletes the previous step runs on the checkpoint thread after the commit and is
    timed apart, like dd's deletion
    -> GB/s, ratio to dd (the dd of the same run);
  * verify: checkpoint.verify metadata, and full (SHA-256 of every file; one rank does all)
    -> s/GB, with the page cache dropped first when --cold (needs root); otherwise warm, or,
    where the last save was written with O_DIRECT, without that checkpoint in it;
  * load: DCP load through the safe reader into allocated, touched tensors -> GB/s (cache
    warm), and the speed-up over DCP's own FileSystemReader (torch.load of every item) loading
    the same checkpoint into the same tensors, alternating;
  * stall: --steps training steps, each a fixed amount of compute (--matmuls 512x512 matmuls,
    standing in for forward and backward) and then an in-place update of every parameter,
    preceded by the checkpointer's wait_staged() as in the trainer; a save after step 2, sync
    vs async: the extra time the loop sees over the mean of the loop without saves just before
    and after, ratio async/sync; and the time the loop spent inside save() and wait_staged().
    The default (--matmuls auto) times one update and one matmul first and gives each step
    --compute-ratio (20) times the update's time in matmuls: in LLM training forward and
    backward take most of a step (an 8B model on 8 H100s, 256 x 8192 tokens a step: ~30 s of
    compute against ~10 ms to update each GPU's shard, ~3000x; 20x is far on the short side).
    --matmuls 8 is the old default: a step that is mostly update (~0.02-0.04 s of matmuls
    against ~0.1 s to update 2 GB), the worst case for hiding the staging copy.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader

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
    """What a trainer hands the checkpointer, around a bare model and an optimizer with one
    scalar of state (SGD without momentum: the bytes are the model's). Without any state, DCP's
    get_optimizer_state_dict would initialise it at every save (a zero-gradient step over the
    whole model), which a trained optimizer never does."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    opt.state[next(iter(model.parameters()))]["step"] = torch.zeros(())
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


def run_steps(
    parts, ck, first: int, steps: int, save_at: int, sync: bool, work: torch.Tensor, matmuls: int
) -> tuple[float, float]:
    """(seconds of the loop, seconds of it spent inside the checkpointer's calls). Steps are
    numbered from ``first``, so that every save is a new step (as in training: retention then
    deletes the previous one after the commit, while the loop goes on)."""
    params = list(parts["model"].model.parameters())
    blocked = 0.0
    start = time.perf_counter()
    for step in range(first, first + steps):
        for _ in range(matmuls):
            work @ work  # forward and backward: a fixed amount of compute per step
        t0 = time.perf_counter()
        ck.wait_staged()  # as the trainer does before the optimizer step
        blocked += time.perf_counter() - t0
        with torch.no_grad():
            torch._foreach_add_(params, 1e-6)  # the update: every saved tensor changes
        if step == first + save_at - 1:
            t0 = time.perf_counter()
            ck.save(step, parts, INFO, sync=sync)
            blocked += time.perf_counter() - t0
    loop = time.perf_counter() - start  # what training sees; an async write may go on
    ck.wait()
    return loop, blocked


def step_compute(
    matmuls: str, ratio: float, model: nn.Module, work: torch.Tensor
) -> tuple[int, str]:
    """The matmuls of one stall-loop step, and a line saying what the step is: with "auto",
    ``ratio`` times the time of one update of every parameter (median of 5 of each)."""
    params: list[torch.Tensor] = list(model.parameters())

    def median_s(fn: Callable[[], object], times: int) -> float:
        spent = []
        for _ in range(times):
            t0 = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - t0)
        return statistics.median(spent)

    with torch.no_grad():
        update_s = median_s(lambda: torch._foreach_add_(params, 1e-6), 5)
    matmul_s = median_s(lambda: [work @ work for _ in range(10)], 5) / 10
    if matmuls == "auto":
        count = max(1, round(ratio * update_s / matmul_s))
        how = f"--matmuls auto: {ratio:g} x the update"
    else:
        count, how = int(matmuls), "--matmuls"
    return count, (
        f"{count} matmuls (~{count * matmul_s:.2f} s; {how}) then the update of every "
        f"parameter (~{update_s:.2f} s): compute {count * matmul_s / update_s:.1f} x the update"
    )


def ratios(values: list[float]) -> str:
    ordered = sorted(values)
    return f"min {ordered[0]:.2f} / median {statistics.median(ordered):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=2.5e8)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument(
        "--matmuls",
        default="auto",
        help="512x512 matmuls per step, or auto: --compute-ratio x the update",
    )
    ap.add_argument("--compute-ratio", type=float, default=20.0,
                    help="with --matmuls auto: a step's compute over its update's time")  # fmt: skip
    ap.add_argument("--runs", type=int, default=3, help="repetitions of dd/save and the stall")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before verifying")
    ap.add_argument(
        "--direct-io", default="never", choices=["never", "sync", "always"],
        help="checkpoint.direct_io: which saves are written with O_DIRECT",
    )  # fmt: skip
    args = ap.parse_args()
    if args.matmuls != "auto" and not args.matmuls.isdigit():
        ap.error(f"--matmuls {args.matmuls!r}: a whole number >= 0, or auto")
    if args.runs < 1 or args.steps < 3 or args.params < 64 or not args.compute_ratio > 0:
        ap.error("--runs must be >= 1, --steps >= 3 (a save after step 2), --params >= 64 "
                 "(64 tensors), --compute-ratio > 0")  # fmt: skip
    params = int(args.params)
    nbytes = params * 4
    work_dir = Path(tempfile.mkdtemp(prefix="eurotrain-ckpt-bench-", dir=args.dir))
    try:
        model = Blob(params)
        dd_s, save_s, retention_s = [], [], []
        cfg = CheckpointConfig(
            dir=str(work_dir / "ck"), interval=1, keep_last=1, direct_io=args.direct_io
        )
        parts = checkpoint_parts(model)
        ck = Checkpointer(cfg, Path(cfg.dir), 0, 1, log=lambda m: None)
        # The first save starts the writer process and maps a fresh staging buffer (page
        # faults); a run's later saves reuse both: measured apart.
        t0 = time.perf_counter()
        ck.save(1, parts, INFO, sync=True)
        first_s = time.perf_counter() - t0

        sum_s = 0.0

        def timed_dd(run: int) -> None:
            nonlocal sum_s
            dd_s.append(dd(work_dir / "dd.bin", nbytes))
            if run == 0:
                t0 = time.perf_counter()
                checksum(work_dir / "dd.bin")
                sum_s = time.perf_counter() - t0
            (work_dir / "dd.bin").unlink()  # outside the timing, like the save's retention

        def timed_save(run: int) -> None:
            t0 = time.perf_counter()
            ck.save(2 + run, parts, INFO, sync=True)  # a new step each run, like training
            save_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ck.wait()  # the retention that deletes the previous step after the commit
            retention_s.append(time.perf_counter() - t0)

        for run in range(args.runs):
            # The order alternates: on a virtual disk a write right after another can run
            # several times as fast as the first after a pause, for dd and saves alike.
            first_up, second = (timed_dd, timed_save) if run % 2 == 0 else (timed_save, timed_dd)
            first_up(run)
            second(run)

        ckpt = work_dir / "ck" / f"step-{1 + args.runs:06d}"
        # Touched, as a model's initialized parameters are (no first-write page faults).
        target = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
        cold = args.cold and drop_page_cache()
        t0 = time.perf_counter()
        verify_checkpoint(ckpt, "metadata")
        meta_s = time.perf_counter() - t0
        cold = args.cold and drop_page_cache()
        t0 = time.perf_counter()
        _, metadata = verify_checkpoint(ckpt, "full")
        full_s = time.perf_counter() - t0
        load_s, dcp_s = [], []
        for _ in range(2):  # alternating; the file is in the page cache after verify
            t0 = time.perf_counter()
            load_state(target, ckpt, metadata, ("model.",))
            load_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
                dcp.load(target, storage_reader=FileSystemReader(ckpt), no_dist=True)
            dcp_s.append(time.perf_counter() - t0)

        work = torch.randn(512, 512)
        matmuls, step_note = step_compute(args.matmuls, args.compute_ratio, model, work)
        stalls, blocks = [], []
        first = 100  # steps after the throughput runs' saves
        bases: list[float] = []

        def loop(save_at: int, sync: bool) -> tuple[float, float]:
            nonlocal first
            first += args.steps
            start = first - args.steps
            return run_steps(parts, ck, start, args.steps, save_at, sync, work, matmuls)

        bases.append(loop(-1, True)[0])
        for _ in range(args.runs):
            sync_s, sync_blocked = loop(2, True)
            # async: the loop waits only where the copy to host memory is not done by the
            # next update; the write overlaps later steps.
            async_loop, async_blocked = loop(2, False)
            bases.append(loop(-1, True)[0])
            # The loop without saves, before and after: the mean of the two is the baseline
            # (the loop alone drifts between rounds on a shared machine).
            base = (bases[-2] + bases[-1]) / 2
            stalls.append((base, max(sync_s - base, 1e-9), max(async_loop - base, 1e-9)))
            blocks.append((sync_blocked, async_blocked))
        ck.close()
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    gb = nbytes / 1e9
    print(f"# Checkpoint benchmark {date.today()} on {platform.node()} ({os.cpu_count()} cores)")
    cmd = (
        f"--params {args.params:g} --dir {args.dir} --steps {args.steps} --runs {args.runs} "
        f"--matmuls {args.matmuls} --direct-io {args.direct_io}"
        + (f" --compute-ratio {args.compute_ratio:g}" if args.matmuls == "auto" else "")
    )
    print(f"command: python benchmarks/checkpoint.py {cmd}" + (" --cold" if args.cold else ""))
    print(f"file system: {detect_fs(args.dir).describe()}; {gb:.2f} GB of fp32 weights")
    for i, (d, s) in enumerate(zip(dd_s, save_s)):
        order = "dd" if i % 2 == 0 else "save"
        print(
            f"run {i + 1} ({order} first): dd write+fsync {gb / d:5.2f} GB/s ({d:.2f} s); save "
            f"(sync, commit) {gb / s:5.2f} GB/s ({s:.2f} s) = {d / s:.2f} x dd"
        )
    print(f"save / dd throughput: {ratios([d / s for d, s in zip(dd_s, save_s)])}; all runs "
          f"together: dd {sum(dd_s):.2f} s, save {sum(save_s):.2f} s = "
          f"{sum(dd_s) / sum(save_s):.2f} x dd")  # fmt: skip
    print(
        "retention after each save's commit (deleting the previous step, off the save's path): "
        + ", ".join(f"{r:.2f}" for r in retention_s)
        + " s"
    )
    print(f"first save of the run (writer start, fresh buffer): {first_s:.2f} s")
    print(f"checksum of the file{gb / sum_s:6.2f} GB/s ({sum_s:.2f} s, page cache warm; "
          f"a save hashes while it writes)")  # fmt: skip
    cache = "page cache dropped" if cold else "page cache warm"
    if not cold and args.direct_io != "never":
        cache = "saved with O_DIRECT: not in the page cache"
    print(f"verify metadata     {meta_s / gb:6.2f} s/GB ({meta_s:.2f} s, {cache})")
    print(f"verify full         {full_s / gb:6.2f} s/GB ({full_s:.2f} s, {cache}, one rank)")
    load, stock = min(load_s), min(dcp_s)
    print(f"load (safe reader)  {gb / load:6.2f} GB/s ({load:.2f} s, page cache warm; min of 2) "
          f"= {stock / load:.2f} x DCP's FileSystemReader ({stock:.2f} s)")  # fmt: skip
    print(f"stall loop step: {step_note}")
    for i, (base, stall_sync, stall_async) in enumerate(stalls):
        print(
            f"run {i + 1}: stall over {args.steps} steps ({base:.2f} s without saving): sync "
            f"+{stall_sync:.2f} s, async +{stall_async:.2f} s = {stall_async / stall_sync:.3f}"
        )
    print(f"async / sync stall (loop time over the loop without saves): "
          f"{ratios([a / s for _, s, a in stalls])}")  # fmt: skip
    print(f"the loop without saves, {len(bases)} times: {min(bases):.2f}-{max(bases):.2f} s "
          f"(its own spread, {max(bases) - min(bases):.2f} s, is the noise in each stall "
          f"above)")  # fmt: skip
    for i, (sync_b, async_b) in enumerate(blocks):
        print(f"run {i + 1}: time inside save() and wait_staged(): sync {sync_b:.2f} s, async "
              f"{async_b:.3f} s = {async_b / sync_b:.3f}")  # fmt: skip
    print(f"async / sync time blocked in the checkpointer: {ratios([a / s for s, a in blocks])}")


if __name__ == "__main__":
    main()
