"""``eurotrain bench comms | train | report``: the command line of eurotrain/bench/."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from eurotrain.errors import ConfigError

USAGE = """usage:
  eurotrain bench comms [--sizes 8K:1G] [--ops all_reduce,...] [--iters 20] [--cluster NAME]
                        [--out DIR]                      (every rank: under srun or torchrun)
  eurotrain bench train CONFIG --nodes 1,2,4,8 [--mode weak|strong] [--steps 20] [--warmup 5]
                        [--cluster NAME] [--gpus-per-node G] [--out DIR] [--submit --time T
                        --account A [--partition P]] [--section.key value ...]
  eurotrain bench report DIR [DIR ...] [--out DIR]"""


def _default_out(kind: str) -> str:
    return f"bench/{kind}-{datetime.now():%Y%m%d-%H%M%S}"


def _profile(name: str | None):
    if name is None:
        return None
    from eurotrain.clusters import load_profile

    return load_profile(name)


def comms(argv: list[str]) -> int:
    from eurotrain.bench.comms import OPS, run_comms, size_range
    from eurotrain.bench.results import new_results, write_results

    ap = argparse.ArgumentParser(prog="eurotrain bench comms")
    ap.add_argument("--sizes", default="8K:1G", help="FROM:TO (x4 steps) or a comma list")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--cluster", help="profile whose nominal link bandwidths to compare with")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    ops = tuple(o for o in args.ops.split(",") if o)
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise ConfigError(f"--ops {','.join(unknown)}: unknown; choose from {', '.join(OPS)}")
    if args.iters < 1 or args.warmup < 0:
        raise ConfigError(f"--iters {args.iters} / --warmup {args.warmup}: need >= 1 / >= 0")
    sizes = size_range(args.sizes)
    profile = _profile(args.cluster)

    import torch
    import torch.distributed as dist

    from eurotrain.distributed import init_distributed, shutdown

    info = init_distributed("auto")
    try:
        if info.world_size < 2:
            raise ConfigError(
                "eurotrain bench comms measures collectives between ranks: start it on every "
                "rank, e.g. `torchrun --nproc-per-node 4 -m eurotrain bench comms` or under srun "
                "(`eurotrain launch --bench comms` renders the job)"
            )
        nominal = None
        if profile is not None:
            nominal = {"intra": profile.links.intra_node_GBps,
                       "inter": profile.links.inter_node_GBps}  # fmt: skip
        say = print if info.is_main else None
        records = run_comms(sizes, ops, getattr(torch, args.dtype), args.iters, args.warmup,
                            nominal, say)  # fmt: skip
        if info.is_main:
            results = new_results(
                profile.name if profile else None,
                torch.cuda.get_device_name() if info.device.type == "cuda" else "cpu",
                max((r["ranks"] for r in records if r["scope"] == "intra"), default=1),
                dist.get_backend(),
            )
            results["comms"] = records
            path = write_results(Path(args.out or _default_out("comms")), results)
            print(f"wrote {path}; `eurotrain bench report {path.parent}` plots it")
    finally:
        shutdown()
    return 0


def train(argv: list[str]) -> int:
    from eurotrain.bench.sweep import parse_nodes, plan_sizes, run_sweep

    ap = argparse.ArgumentParser(prog="eurotrain bench train")
    ap.add_argument("--nodes", required=True, help="node counts, e.g. 1,2,4,8")
    ap.add_argument("--mode", choices=("weak", "strong"), default="weak")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="first steps left out of the means (default: steps / 3, at most 5)",
    )
    ap.add_argument("--cluster", help="profile (GPUs per node, CPU binding, peak for MFU)")
    ap.add_argument("--gpus-per-node", type=int)
    ap.add_argument("--out", default=None)
    ap.add_argument("--submit", action="store_true", help="one sbatch job per node count")
    ap.add_argument("--time", help="with --submit: walltime of each job")
    ap.add_argument("--account", help="with --submit")
    ap.add_argument("--partition", help="with --submit")
    ap.add_argument("config")
    ap.add_argument("overrides", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(5, args.steps // 3)
    if args.steps <= args.warmup or args.warmup < 0:
        raise ConfigError(
            f"--steps {args.steps} --warmup {args.warmup}: need steps > warmup >= 0 (the means "
            f"are over the steps after warm-up)"
        )
    profile = _profile(args.cluster)
    args.out = args.out or _default_out("train")
    if profile is not None and profile.accelerator.peak_bf16_tflops:
        args.overrides = [
            "--train.peak_tflops",
            f"{profile.accelerator.peak_bf16_tflops:g}",
            *args.overrides,
        ]
    if profile is not None and profile.accelerator.vendor == "cpu":
        args.overrides = ["--train.device", "cpu", *args.overrides]
    if not args.submit:
        run_sweep(args, profile)
        return 0
    if profile is None or args.time is None:
        raise ConfigError("--submit needs --cluster NAME and --time [D-]HH:MM:SS for its jobs")
    from eurotrain.launch import LaunchRequest, plan, render, submit

    nodes = parse_nodes(args.nodes)
    gpus = args.gpus_per_node or profile.gpus_per_node
    cuda = profile.accelerator.vendor != "cpu"
    plan_sizes(args.config, args.overrides, nodes, gpus, args.mode, cuda)  # all, before any job
    for k in nodes:
        bench = ["--nodes", str(k), "--mode", args.mode, "--steps", str(args.steps),
                 "--warmup", str(args.warmup), "--out", f"{args.out}/nodes-{k}"]  # fmt: skip
        req = LaunchRequest(
            cluster=profile.name, nodes=k, time=args.time, config=args.config,
            overrides=list(args.overrides), account=args.account, partition=args.partition,
            gpus_per_node=gpus, bench="train", bench_args=bench,
        )  # fmt: skip
        p = plan(req)
        job = submit(p, render(p))
        print(f"submitted job {job}: {k} node(s), results in {args.out}/nodes-{k}")
    dirs = " ".join(f"{args.out}/nodes-{k}" for k in nodes)
    print(f"when the jobs are done: eurotrain bench report {dirs}")
    return 0


def report(argv: list[str]) -> int:
    from eurotrain.bench.report import write_report

    ap = argparse.ArgumentParser(prog="eurotrain bench report")
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, help="default: DIR/report (the first DIR)")
    args = ap.parse_args(argv)
    path = write_report(args.dirs, args.out or args.dirs[0] / "report")
    print(f"wrote {path} and its plots")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"comms": comms, "train": train, "report": report}
    if not argv or argv[0] not in commands:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])
