"""Run a function on N real processes with the gloo backend (no mocks of torch.distributed).

``run_distributed(fn, world_size, *args)`` starts N processes (forked from a server that has
imported torch once), initialises a process group over
a free local TCP port, calls ``fn(rank, world_size, *args)`` on each and returns the results by
rank. Exceptions on any rank fail the test with that rank's traceback. ``run_torchrun`` starts
the real command line under torchrun, as a user would.
"""

from __future__ import annotations

import json
import os
import queue as queue_module
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ranks are forked from a server process that has imported torch and the trainer once, instead of
# each starting a fresh interpreter (about 3.5 s of CPU per rank on 2 cores, most of the suite's
# multi-process cost). Forking there is safe: the server has started no threads, no process group
# and no device context. A rank takes the test process's environment as it is at the call.
PRELOAD = ["torch", "torch.distributed", "eurotrain.train"]
_context: Any = None


def _mp_context() -> Any:
    global _context
    if _context is None:
        _context = mp.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _worker(
    rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue, env: dict
) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # the OpenMP runtime read OMP_NUM_THREADS in the server already
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        # gloo's handshake can finish on one rank before the other: a rank whose function needs
        # no collective would otherwise exit and close the connection its peer is still opening.
        dist.barrier()
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 300) -> list[Any]:
    """Results by rank; fails at once when a rank raises or dies without reporting (a crash in
    native code, a kill), and after ``timeout`` seconds when a rank hangs, so a broken rank
    never waits for the test suite's own time limit."""
    ctx = _mp_context()
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, dict(os.environ)))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size and not errors:
            try:
                rank, status, payload = queue.get(timeout=1.0)
            except queue_module.Empty:
                # A rank that exited has flushed what it put; one that is dead and silent crashed.
                dead = [
                    f"rank {r} exited with code {p.exitcode} without reporting"
                    for r, p in enumerate(procs)
                    if r not in results and p.exitcode is not None
                ]
                if dead and queue.empty():
                    errors.extend(dead)
                elif time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(results))
                    errors.append(f"ranks {missing} did not report within {timeout:.0f} s (hung)")
                continue
            if status == "error":
                errors.append(f"rank {rank}:\n{payload}")
            else:
                results[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=5 if errors else max(5.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("distributed worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def run_torchrun(
    nproc: int, args: list[str], cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node N -m eurotrain.train ARGS`` as a subprocess."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(nproc), "--master-port", str(free_port()),
        "-m", "eurotrain.train", *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        cmd, cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


SMALL_RUN = (
    "--model.num_layers", "2", "--model.dim", "64", "--model.ffn_dim", "128",
    "--data.seq_len", "32", "--train.global_batch_size", "4", "--train.micro_batch_size", "4",
    "--logging.log_interval", "1", "--checkpoint.async_save", "false",
    "--fault.hang_timeout_s", "-1",
)  # fmt: skip
"""The tiny model cut to two narrow blocks and one micro-batch of 4, logging every step and
saving synchronously: a run of a few steps takes about a second."""


def small_run(out: Path, *overrides: str) -> Any:
    """configs/tiny.yaml with SMALL_RUN, run "run" under ``out``, then ``overrides``."""
    from eurotrain.config import load_config

    base = ["--train.output_dir", str(out), "--train.run_name", "run", *SMALL_RUN]
    return load_config(REPO / "configs" / "tiny.yaml", [*base, *overrides])
