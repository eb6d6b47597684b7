"""One size of a training benchmark, run by every rank (``python -m eurotrain.bench.train``):
the trainer for ``--steps`` steps, the first ``--warmup`` left out of the averages, then one more
step, profiled to split a step's time into compute and exposed communication (and left out of
the averages: the profiler slows the step it records).

The split: the profiler records one steady-state step; compute is the time spent in operators
other than communication (on GPUs: the device time of non-communication kernels; on CPUs: the
self time of non-communication operators), and exposed communication is the step time minus
compute, i.e. the communication (and waiting) that compute did not hide.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from eurotrain.callbacks import Callback, StepMetrics
from eurotrain.config import load_config
from eurotrain.errors import run_command

COMM = re.compile(r"nccl|rccl|gloo|c10d|all_reduce|allreduce|all_gather|allgather|reduce_scatter"
                  r"|alltoall|all_to_all|broadcast|record_param_comms|send|recv|barrier", re.I)  # fmt: skip


class Collect(Callback):
    """The per-step metrics of steps first..last (the benchmark logs every step)."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.steps: list[dict[str, Any]] = []

    def on_step_end(self, trainer: Any, step: int, metrics: StepMetrics) -> None:
        if self.first <= step <= self.last:
            self.steps.append(dict(metrics))


class ProfileSplit(Callback):
    """Profiles step ``step`` and measures its compute time (seconds) as described above."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.compute_s: float | None = None
        self._prof: Any = None

    def on_step_start(self, trainer: Any, step: int) -> None:
        if step == self.step:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU]
            if trainer.dist.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self._prof = profile(activities=activities)
            self._prof.__enter__()

    def on_step_end(self, trainer: Any, step: int, metrics: StepMetrics) -> None:
        if step != self.step or self._prof is None:
            return
        self._prof.__exit__(None, None, None)
        cuda = trainer.dist.device.type == "cuda"
        total_us = 0.0
        for event in self._prof.key_averages():
            if COMM.search(event.key):
                continue
            total_us += event.self_device_time_total if cuda else event.self_cpu_time_total
        self.compute_s = total_us / 1e6
        self._prof = None


def run(config: str, overrides: list[str], steps: int, warmup: int, out: Path) -> dict[str, Any]:
    """Train, and on rank 0 return the record of this size (other ranks: {})."""
    from eurotrain.train import Trainer

    cfg = load_config(config, [
        *overrides, "--train.steps", str(steps + 1), "--logging.log_interval", "1",
        "--checkpoint.interval", "0", "--checkpoint.resume", "none",
        "--train.output_dir", str(out), "--train.run_name", "run",
    ])  # fmt: skip
    collect = Collect(warmup + 1, steps)
    split = ProfileSplit(steps + 1)  # the extra last step
    trainer = Trainer(cfg, callbacks=[collect, split])
    trainer.train()
    if not trainer.dist.is_main:
        return {}
    ranks = trainer.dist.world_size
    peak = None
    if trainer.dist.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(trainer.dist.device) / 2**30

    def mean(key: str) -> float | None:
        values = [s[key] for s in collect.steps if s.get(key) is not None]
        return statistics.fmean(values) if values else None

    step_time = mean("step_time_s")
    compute = min(split.compute_s, step_time) if split.compute_s and step_time else None
    return {
        "config": config,
        "model": cfg.model.name,
        "params": cfg.model.num_params(),
        "ranks": ranks,
        "layout": trainer.dims.degrees(),
        "global_batch": cfg.train.global_batch_size,
        "micro_batch": cfg.train.micro_batch_size,
        "seq_len": cfg.data.seq_len,
        "steps": steps,
        "warmup_steps": warmup,
        "tokens_per_s_per_gpu": mean("tokens_per_s_per_device"),
        "tflops_per_gpu": mean("tflops_per_device"),
        "mfu": mean("mfu"),
        "peak_memory_gib": peak,
        "step_time_s": step_time,
        "compute_s": compute,
        "exposed_comm_s": max(0.0, step_time - compute) if step_time and compute else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eurotrain.bench.train")
    ap.add_argument("--out", type=Path, required=True, help="record file (written by rank 0)")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)

    def body() -> int:
        from eurotrain.distributed import shutdown

        try:
            record = run(args.config, args.overrides, args.steps, args.warmup, args.out.parent)
        finally:
            shutdown()
        if record:
            args.out.write_text(json.dumps(record))
        return 0

    return run_command("eurotrain bench train", body)


if __name__ == "__main__":
    sys.exit(main())
