"""``eurotrain bench train``: the same model at several node counts, one size after another.

Inside a SLURM allocation each size k is one job step, ``srun --nodes k --relative 0`` (the
allocation's first k nodes), with its own rendezvous port; outside SLURM only one node can be
measured (torchrun on this machine). Weak scaling keeps the per-GPU batch (the global batch grows
with the node count), strong scaling keeps the global batch. Every size is checked with the
trainer's own check_layout before anything runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eurotrain.bench.results import cell, check_record, new_results, write_results
from eurotrain.clusters import ClusterProfile
from eurotrain.config import load_config
from eurotrain.distributed import PORT_BASE, PORT_SPAN
from eurotrain.errors import ConfigError, unreadable


@dataclass(frozen=True)
class Size:
    nodes: int
    ranks: int
    global_batch: int
    overrides: list[str]


def parse_nodes(text: str) -> list[int]:
    try:
        nodes = [int(n) for n in text.split(",")]
    except ValueError:
        raise ConfigError(f"--nodes {text!r}: give node counts like 1,2,4,8") from None
    if not nodes or min(nodes) < 1 or nodes != sorted(set(nodes)):
        raise ConfigError(f"--nodes {text!r}: node counts >= 1, increasing, each once (1,2,4,8)")
    return nodes


def plan_sizes(
    config: str,
    overrides: list[str],
    nodes: list[int],
    gpus_per_node: int,
    mode: str,
    cuda: bool,
) -> list[Size]:
    """One Size per node count, each checked as the trainer will check it (ConfigError names
    the node count that does not fit)."""
    from eurotrain.parallel.checks import check_layout

    base = load_config(config, overrides)
    sizes = []
    for k in nodes:
        if mode == "weak" and k % nodes[0]:
            raise ConfigError(
                f"--nodes {','.join(map(str, nodes))}: weak scaling multiplies the batch by "
                f"k / {nodes[0]}; use node counts that are multiples of the first"
            )
        batch = base.train.global_batch_size
        if mode == "weak":
            batch *= k // nodes[0]
        extra = [*overrides, "--train.global_batch_size", str(batch)]
        world = k * gpus_per_node
        try:
            check_layout(load_config(config, extra), world, cuda=cuda)
        except ConfigError as e:
            raise ConfigError(f"{config} does not fit {k} node(s) ({world} ranks): {e}") from None
        sizes.append(Size(k, world, batch, extra))
    return sizes


def _first_node_address(profile: ClusterProfile | None) -> str:
    """The allocation's first node, as the ranks can reach it (its NodeAddr for emulated nodes
    whose names do not resolve, as the profile says)."""
    names = subprocess.run(
        ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    if profile is None or profile.master_addr != "nodeaddr":
        return names[0]
    info = subprocess.run(
        ["scontrol", "show", "node", names[0]], capture_output=True, text=True, check=True
    ).stdout
    return next(w.split("=", 1)[1] for w in info.split() if w.startswith("NodeAddr="))


def _command(size: Size, gpus: int, args: Any, record: Path, profile: ClusterProfile | None,
             index: int) -> tuple[list[str], dict[str, str]]:  # fmt: skip
    worker = [
        sys.executable, "-m", "eurotrain.bench.train", "--out", str(record),
        "--steps", str(args.steps), "--warmup", str(args.warmup), args.config, *size.overrides,
    ]  # fmt: skip
    env = dict(os.environ)
    if not os.environ.get("SLURM_JOB_ID"):  # one node, this machine
        run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(gpus),
               "--master-port", str(_free_port()), *worker[1:]]  # fmt: skip
        return run, env
    env["MASTER_ADDR"] = _first_node_address(profile)
    job = int(os.environ["SLURM_JOB_ID"])
    env["MASTER_PORT"] = str(PORT_BASE + (job * 16 + index + 1) % PORT_SPAN)  # one per step
    # --ntasks too: srun would otherwise take the allocation's task count from the environment.
    srun = ["srun", "--kill-on-bad-exit=1", "--relative=0", f"--nodes={size.nodes}",
            f"--ntasks={size.ranks}", f"--ntasks-per-node={gpus}"]  # fmt: skip
    if profile is not None:
        srun.append(f"--cpus-per-task={profile.cpus_per_task}")
        if profile.cpu_bind:
            srun.append(f"--cpu-bind={profile.cpu_bind}")
    return [*srun, *worker], env


def run_sweep(args: Any, profile: ClusterProfile | None) -> Path:
    nodes = parse_nodes(args.nodes)
    gpus = args.gpus_per_node or (profile.gpus_per_node if profile else 1)
    cuda = profile.accelerator.vendor != "cpu" if profile else _cuda_here()
    allocated = int(os.environ.get("SLURM_JOB_NUM_NODES", "1"))
    if max(nodes) > allocated:
        where = (
            f"this allocation has {allocated}"
            if os.environ.get("SLURM_JOB_ID")
            else ("outside a SLURM allocation only 1 can be measured")
        )
        raise ConfigError(
            f"--nodes {args.nodes}: {max(nodes)} node(s) asked for, {where}; allocate "
            f"{max(nodes)} nodes (salloc/sbatch -N {max(nodes)}, or `eurotrain launch --bench "
            f"train`), or use --submit for one job per size"
        )
    sizes = plan_sizes(args.config, args.overrides, nodes, gpus, args.mode, cuda)
    out = Path(args.out)
    results = new_results(
        profile.name if profile else None,
        profile.accelerator.model if profile else ("cuda" if cuda else "cpu"),
        gpus, "nccl" if cuda else "gloo",
    )  # fmt: skip
    for i, size in enumerate(sizes):
        print(f"eurotrain bench: size {i + 1}/{len(sizes)}: {size.nodes} node(s) x {gpus} = "
              f"{size.ranks} ranks, global batch {size.global_batch}", flush=True)  # fmt: skip
        record = out / f"nodes-{size.nodes}" / "record.json"
        record.parent.mkdir(parents=True, exist_ok=True)
        cmd, env = _command(size, gpus, args, record, profile, i)
        done = subprocess.run(cmd, env=env, check=False)
        if done.returncode != 0 or not record.exists():
            raise ConfigError(
                f"size {size.nodes} node(s) failed (exit {done.returncode}); its output is "
                f"above, its run directory {record.parent}"
            )
        results["train"].append(_read_record(record, size.nodes, args.mode))
    first = results["train"][0].get("tokens_per_s_per_gpu")
    for entry in results["train"]:
        tokens = entry.get("tokens_per_s_per_gpu")
        entry["scaling_efficiency"] = tokens / first if first and tokens is not None else None
    path = write_results(out, results)
    print(summary(results["train"]), flush=True)
    return path


def _read_record(record: Path, nodes: int, mode: str) -> dict[str, Any]:
    """The record one size's run wrote, checked as bench.json's records are."""
    try:
        entry = json.loads(record.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ConfigError(f"{record}: unreadable ({unreadable(e)}); run that size again") from None
    if isinstance(entry, dict):
        entry.update(nodes=nodes, mode=mode)
    problem = check_record("train", entry)
    if problem:
        raise ConfigError(f"{record}: {problem}; run that size again")
    return entry


def summary(records: list[dict[str, Any]]) -> str:
    lines = ["nodes  ranks  tokens/s/GPU  TFLOP/s/GPU    MFU  step s  exposed comm s  efficiency"]
    for r in records:
        lines.append(
            f"{r['nodes']:5d}  {cell(r.get('ranks'), 'd'):>5}  "
            f"{cell(r.get('tokens_per_s_per_gpu'), ',.0f'):>12}  "
            f"{cell(r.get('tflops_per_gpu')):>11}  {cell(r.get('mfu'), '.3f'):>5}  "
            f"{cell(r.get('step_time_s'), '.3f'):>6}  {cell(r.get('exposed_comm_s'), '.3f'):>14}  "
            f"{cell(r.get('scaling_efficiency'), '.3f'):>10}"
        )
    return "\n".join(lines)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()
