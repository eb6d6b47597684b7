"""``eurotrain launch`` on the command line: parse, check, render, and submit with sbatch."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from eurotrain.clusters import profile_listing
from eurotrain.launch.request import JobFailedError, LaunchError, LaunchRequest, Plan, plan
from eurotrain.launch.script import render


def submit(p: Plan, script: str, wait: bool = False) -> str:
    """sbatch the script (from stdin); keep a copy next to the logs; return the job id."""
    Path(p.request.log_dir).mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable"] + (["--wait"] if wait else [])
    try:
        out = subprocess.run(cmd, input=script, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise LaunchError(
            "sbatch not found: run `eurotrain launch` on a SLURM login node"
        ) from None
    job_id = out.stdout.strip().split(";")[0]
    if out.returncode != 0 and not (wait and job_id):
        said = "; ".join(line.strip() for line in out.stderr.splitlines() if line.strip())
        raise LaunchError(f"sbatch failed ({out.returncode}): {said}")
    (Path(p.request.log_dir) / f"{p.job_name}-{job_id}.sbatch").write_text(script)
    if wait and out.returncode != 0:
        raise JobFailedError(
            f"job {job_id} failed (sbatch --wait exit {out.returncode}); see "
            f"{p.request.log_dir}/{p.job_name}-{job_id}.out"
        )
    return job_id


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="eurotrain launch",
        description="Render (and submit) an sbatch job that trains CONFIG on a EuroHPC machine. "
        "Launch options come before CONFIG; everything after CONFIG is a config override.",
    )
    ap.add_argument("--list", action="store_true", help="list the cluster profiles and exit")
    ap.add_argument("--cluster", required=True, help="profile name (see --list)")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--time", required=True, help="walltime [D-]HH:MM:SS")
    ap.add_argument("--account", help="project account to charge")
    ap.add_argument("--partition", help="a queue name from the profile (default: its default)")
    ap.add_argument("--container", help="Apptainer/Singularity image to run the ranks in")
    ap.add_argument("--gpus-per-node", type=int, help="GPUs (ranks) per node (default: all)")
    ap.add_argument("--launcher", choices=("srun", "torchrun"), default="srun")
    ap.add_argument("--cpu-bind", help="srun --cpu-bind for the ranks, e.g. none or cores "
                    "(default: the profile's cpu_bind; compare them with a short run)")  # fmt: skip
    ap.add_argument("--python", help="python on the compute nodes (default: this one, or "
                    "python3 inside --container)")  # fmt: skip
    ap.add_argument("--job-name", help="default: eurotrain-<model.name>")
    ap.add_argument("--log-dir", default="logs", help="job logs go to LOG_DIR/<job>-<id>.out")
    ap.add_argument("--signal-seconds", type=int, default=300,
                    help="USR1 this many seconds before the walltime")  # fmt: skip
    ap.add_argument("--chain", type=int, default=1, metavar="N",
                    help="keep the run going for up to N jobs: at the walltime warning the job "
                    "requeues itself unless the run is done (needs checkpoints)")  # fmt: skip
    ap.add_argument("--until-done", action="store_true",
                    help="a chain without a length: requeue until train.steps are done")  # fmt: skip
    ap.add_argument("--spare-nodes", type=int, default=0, metavar="K",
                    help="allocate K nodes more than the ranks use; a restart leaves a failing "
                    "node out")  # fmt: skip
    ap.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    ap.add_argument("--wait", action="store_true", help="sbatch --wait: block until the job ends")
    ap.add_argument(
        "--bench",
        choices=("train", "comms"),
        help="a benchmark job instead of training: a scaling sweep of CONFIG "
        "(eurotrain bench train) or the collectives (eurotrain bench comms)",
    )
    ap.add_argument(
        "--sweep",
        help="--bench train: node counts, e.g. 1,2,4,8 (default: powers of two up to --nodes)",
    )
    ap.add_argument(
        "--mode",
        choices=("weak", "strong"),
        default="weak",
        help="--bench train: keep the per-GPU batch (weak) or the global batch",
    )
    ap.add_argument("--bench-steps", type=int, default=20, help="--bench train: steps per size")
    ap.add_argument("--sizes", default="8K:1G", help="--bench comms: message sizes")
    ap.add_argument("--bench-out", help="--bench: results directory (default bench/<kind>-<job>)")
    ap.add_argument("config", nargs="?", help="training config (YAML); not with --bench comms")
    ap.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key value ...")
    return ap


def _bench_args(args: argparse.Namespace) -> list[str]:
    """The `eurotrain bench` options a --bench job passes on."""
    out = ["--out", args.bench_out] if args.bench_out else []  # default: bench/<kind>-<time>
    if args.bench == "comms":
        return ["--sizes", args.sizes, *out]
    if args.bench == "train":
        sweep = args.sweep or ",".join(
            str(2**i) for i in range(args.nodes.bit_length()) if 2**i <= args.nodes
        )
        return ["--nodes", sweep, "--mode", args.mode, "--steps", str(args.bench_steps), *out]
    return []


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--list" in argv and "--help" not in argv and "-h" not in argv:
        print(profile_listing())
        return 0
    args = parser().parse_args(argv)
    if args.chain < 1:
        raise LaunchError(f"--chain {args.chain}: give the number of jobs (>= 1), or --until-done")
    if args.config is None and args.bench != "comms":
        raise LaunchError("CONFIG missing: give the training config (YAML) after the options")
    if args.python is not None:
        python = args.python
    else:
        python = "python3" if args.container is not None else sys.executable
    req = LaunchRequest(
        cluster=args.cluster, nodes=args.nodes, time=args.time, config=args.config,
        overrides=list(args.overrides), account=args.account, partition=args.partition,
        container=args.container, gpus_per_node=args.gpus_per_node, launcher=args.launcher,
        python=python, job_name=args.job_name, log_dir=args.log_dir,
        signal_seconds=args.signal_seconds, chain=0 if args.until_done else args.chain,
        spare_nodes=args.spare_nodes, bench=args.bench, bench_args=_bench_args(args),
        cpu_bind=args.cpu_bind, dry_run=args.dry_run,
    )  # fmt: skip
    # A bad request raises LaunchError or ConfigError: the command line prints it as one line
    # and exits 2 (eurotrain.errors.run_command).
    p = plan(req)
    for note in p.notes:
        print(f"eurotrain launch: note: {note}", file=sys.stderr)
    script = render(p)
    if args.dry_run:
        print(script, end="")
        return 0
    job_id = submit(p, script, wait=args.wait)
    print(f"submitted job {job_id}: {p.world_size} ranks on {req.nodes} x {p.profile.name}; "
          f"log {req.log_dir}/{p.job_name}-{job_id}.out")  # fmt: skip
    return 0
