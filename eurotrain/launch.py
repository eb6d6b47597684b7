"""``eurotrain launch``: render a cluster profile and a training config into an sbatch script.

Everything that can be wrong is checked before anything is submitted: the cluster name, GPUs
per node, walltime against the queue's limit, nodes against the queue's size, the account, the
config itself, and whether its parallel layout and batch fit nodes x GPUs. The rendered script
is deterministic (no timestamps, no host-specific paths unless asked for) so it can be reviewed
and compared against golden files.

Two ways to start the ranks, both inside one sbatch allocation:
  srun      one task per GPU, CPU binding from the profile; ranks read SLURM_PROCID etc.
  torchrun  one task per node running torchrun with a c10d rendezvous on the first node.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from eurotrain.clusters import ClusterProfile, Queue, load_profile, parse_walltime
from eurotrain.configtools import ConfigError

PORT_BASE = 20000
"""MASTER_PORT = PORT_BASE + job id % PORT_SPAN: two jobs sharing a node rarely collide, and
every rank of one job computes the same port without talking (also in eurotrain.distributed)."""
PORT_SPAN = 20000


@dataclass
class LaunchRequest:
    cluster: str
    nodes: int
    time: str
    config: str
    overrides: list[str] = field(default_factory=list)
    account: str | None = None
    partition: str | None = None
    container: str | None = None
    gpus_per_node: int | None = None
    launcher: str = "srun"
    python: str = sys.executable
    job_name: str | None = None
    log_dir: str = "logs"
    signal_seconds: int = 300


@dataclass
class Plan:
    """A checked request: what the script will ask for."""

    profile: ClusterProfile
    request: LaunchRequest
    queue_name: str
    queue: Queue
    gpus_per_node: int
    world_size: int
    layout: str
    job_name: str
    train_args: list[str]


def _fail(message: str) -> None:
    raise ValueError(message)


def plan(req: LaunchRequest) -> Plan:
    """Check a request against its cluster profile and its config; raise ValueError if wrong."""
    profile = load_profile(req.cluster)
    if req.nodes < 1:
        _fail(f"--nodes {req.nodes}: must be >= 1")
    gpus = req.gpus_per_node or profile.gpus_per_node
    if not 1 <= gpus <= profile.gpus_per_node:
        _fail(
            f"--gpus-per-node {gpus}: {profile.name} nodes have {profile.gpus_per_node} "
            f"{'GPUs' if profile.accelerator.vendor != 'cpu' else 'rank slots'} "
            f"({profile.accelerator.model}); choose 1..{profile.gpus_per_node}"
        )
    if req.launcher not in ("srun", "torchrun"):
        _fail(f"--launcher {req.launcher!r}: choose srun or torchrun")
    queue_name, queue = profile.queue(req.partition)
    seconds = parse_walltime(req.time)
    if queue.max_time and seconds > parse_walltime(queue.max_time):
        longer = [
            q
            for q, v in profile.queues.items()
            if v.max_time and parse_walltime(v.max_time) >= seconds
        ]
        hint = f", or use --partition {longer[0]}" if longer else ""
        _fail(
            f"--time {req.time} exceeds the {queue.max_time} limit of {profile.name} queue "
            f"{queue_name!r} (partition {queue.partition}{', qos ' + queue.qos if queue.qos else ''})"
            f": shorten the job and resume from a checkpoint{hint}"
        )
    if req.nodes < queue.min_nodes or (queue.max_nodes and req.nodes > queue.max_nodes):
        fits = [
            q
            for q, v in profile.queues.items()
            if v.max_nodes and v.min_nodes <= req.nodes <= v.max_nodes  # known limits only
        ]
        limit = f"{queue.min_nodes}..{queue.max_nodes or 'any'}"
        hint = f"; --partition {fits[0]} takes {req.nodes} nodes" if fits else ""
        _fail(f"--nodes {req.nodes}: {profile.name} queue {queue_name!r} takes {limit} nodes{hint}")
    if profile.account_required and not req.account:
        example = (
            f" (accounts here look like {profile.account_example})"
            if profile.account_example
            else ""
        )
        _fail(
            f"{profile.name} needs a project account: pass --account ACCOUNT{example}; "
            f"`sacctmgr show assoc user=$USER` or the centre's portal lists yours"
        )
    world = req.nodes * gpus
    layout = _check_config(req, world, cuda=profile.accelerator.vendor != "cpu")
    train_args = [req.config]
    if profile.accelerator.vendor == "cpu":
        train_args += ["--train.device", "cpu"]
    if profile.accelerator.peak_bf16_tflops:
        train_args += ["--train.peak_tflops", f"{profile.accelerator.peak_bf16_tflops:g}"]
    train_args += req.overrides
    job_name = req.job_name or f"eurotrain-{_model_name(req)}"
    return Plan(profile, req, queue_name, queue, gpus, world, layout, job_name, train_args)


def _model_name(req: LaunchRequest) -> str:
    from eurotrain.config import load_config

    return load_config(req.config, req.overrides).model.name


def _check_config(req: LaunchRequest, world: int, cuda: bool) -> str:
    """The config loads and its layout and batch fit `world` ranks: the same check_layout the
    trainer runs first on every rank, so a job is refused here rather than after it queued."""
    from eurotrain.config import load_config
    from eurotrain.parallel.checks import check_layout

    try:
        cfg = load_config(req.config, req.overrides)
        dims = check_layout(cfg, world, cuda=cuda)
    except ConfigError as e:
        raise ConfigError(f"{req.config} on {req.nodes} node(s) ({world} ranks): {e}") from None
    return dims.describe()


# ---- rendering ---------------------------------------------------------------------------
def _q(words: list[str]) -> str:
    return " ".join(shlex.quote(w) for w in words)


def _sbatch_header(p: Plan) -> list[str]:
    prof, req = p.profile, p.request
    per_node = 1 if req.launcher == "torchrun" else p.gpus_per_node
    cpus = prof.cpus_per_task * (p.gpus_per_node if req.launcher == "torchrun" else 1)
    opts = [f"--job-name={p.job_name}"]
    if req.account:
        opts.append(f"--account={req.account}")
    opts.append(f"--partition={p.queue.partition}")
    if p.queue.qos:
        opts.append(f"--qos={p.queue.qos}")
    opts += [
        f"--nodes={req.nodes}",
        f"--ntasks-per-node={per_node}",
        f"--cpus-per-task={cpus}",
    ]
    if prof.gpu_request == "gres":
        opts.append(f"--gres=gpu:{p.gpus_per_node}")
    elif prof.gpu_request == "gpus-per-node":
        opts.append(f"--gpus-per-node={p.gpus_per_node}")
    opts += [
        f"--time={req.time}",
        f"--output={req.log_dir}/%x-%j.out",
        # SLURM warns this shell before the walltime; the trap below passes it to the ranks,
        # which checkpoint and stop (eurotrain's fault handling).
        f"--signal=B:USR1@{req.signal_seconds}",
    ]
    opts += prof.sbatch_extra
    return [f"#SBATCH {o}" for o in opts]


def _rank_command(p: Plan) -> list[str]:
    """The command every rank (srun) or every node (torchrun) runs, container included."""
    req = p.request
    if req.launcher == "torchrun":
        cmd = [
            req.python, "-m", "torch.distributed.run",
            "--nnodes", str(req.nodes), "--nproc-per-node", str(p.gpus_per_node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", "$MASTER_ADDR:$MASTER_PORT",
            "--rdzv-id", "$SLURM_JOB_ID", "--max-restarts", "0",
            "-m", "eurotrain.train", *p.train_args,
        ]  # fmt: skip
    else:
        cmd = [req.python, "-m", "eurotrain.train", *p.train_args]
    if req.container:
        c = p.profile.container
        binds = ["--bind", ",".join(c.binds)] if c.binds else []
        cmd = [c.runtime, "exec", *c.flags, *binds, req.container, *cmd]
    return cmd


def _export(name: str, value: str) -> str:
    """export NAME=VALUE; a value with $VARIABLES stays expandable (double quotes)."""
    if "$" in value:
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`")
        return f'export {name}="{escaped}"'
    return f"export {name}={shlex.quote(value)}"


def _shell_words(words: list[str]) -> str:
    """Quote words for bash, leaving the $VARIABLES the torchrun line needs expandable."""
    out = []
    for w in words:
        out.append(f'"{w}"' if w.startswith("$") or "$MASTER" in w else shlex.quote(w))
    return " ".join(out)


def render(p: Plan) -> str:
    prof, req = p.profile, p.request
    lines = [
        "#!/bin/bash",
        f"# eurotrain launch: {prof.name} ({prof.description})",
        f"# {req.nodes} node(s) x {p.gpus_per_node} {prof.accelerator.model} = {p.world_size} "
        f"ranks, layout {p.layout}, launcher {req.launcher}, queue {p.queue_name}",
        *_sbatch_header(p),
        "",
        "set -euo pipefail",
        "",
    ]
    if prof.modules:
        lines += ["# Software environment", *(f"module load {m}" for m in prof.modules), ""]
    if prof.setup:
        lines += ["# Machine set-up (see the profile's comments)", *prof.setup, ""]
    if req.container and prof.container.setup:
        lines += [f"# Container runtime ({prof.container.runtime})", *prof.container.setup, ""]
    if prof.comm.env:
        lines.append(f"# Communication: {prof.comm.library.upper()} on this network")
        lines += [_export(k, v) for k, v in prof.comm.env.items()]
        lines.append("")
    env = {**prof.env, "OMP_NUM_THREADS": str(prof.cpus_per_task), "PYTHONUNBUFFERED": "1"}
    lines.append("# Every rank")
    lines += [_export(k, v) for k, v in env.items()]
    lines += [
        "",
        "# Rendezvous: the allocation's first node, a port derived from the job id",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
    ]
    if prof.master_addr == "nodeaddr":
        lines.append(
            "MASTER_ADDR=$(scontrol show node \"$head_node\" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')"
        )
    else:
        lines.append("MASTER_ADDR=$head_node")
    lines += [
        f"MASTER_PORT=$(({PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN}))",
        "export MASTER_ADDR MASTER_PORT",
        'echo "eurotrain: job $SLURM_JOB_ID, $SLURM_JOB_NUM_NODES node(s): $SLURM_JOB_NODELIST;'
        ' rendezvous $MASTER_ADDR:$MASTER_PORT"',
        "",
    ]
    srun = ["srun", "--kill-on-bad-exit=1"]
    if req.launcher == "torchrun":
        srun += ["--ntasks-per-node=1", f"--cpus-per-task={prof.cpus_per_task * p.gpus_per_node}"]
        lines.append("# One torchrun per node; it starts one worker per GPU. Workers ignore USR1")
        lines.append("# until the trainer installs its handler (torchrun itself would die of it).")
        prefix = ["bash", "-c", 'trap "" USR1; exec "$@"', "torchrun-node"]
    else:
        srun += [
            f"--ntasks-per-node={p.gpus_per_node}",
            f"--cpus-per-task={prof.cpus_per_task}",
        ]
        if prof.cpu_bind:
            srun.append(f"--cpu-bind={prof.cpu_bind}")
        lines.append("# One task per GPU; each rank takes GPU number SLURM_LOCALID.")
        prefix = []
    command = _q(srun + prefix) + " \\\n    " + _shell_words(_rank_command(p)) + " &"
    lines += [
        command,
        "ranks=$!",
        'trap \'echo "eurotrain: walltime warning (USR1), passing it on"; '
        'kill -USR1 "$ranks" 2>/dev/null || true\' USR1',
        "# wait returns early when the trap fires; keep waiting until srun itself ends.",
        "while true; do",
        '    status=0; wait "$ranks" || status=$?',
        '    kill -0 "$ranks" 2>/dev/null || break',
        "done",
        'exit "$status"',
        "",
    ]
    return "\n".join(lines)


def submit(p: Plan, script: str, wait: bool = False) -> str:
    """sbatch the script (from stdin); keep a copy next to the logs; return the job id."""
    Path(p.request.log_dir).mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable"] + (["--wait"] if wait else [])
    try:
        out = subprocess.run(cmd, input=script, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ValueError("sbatch not found: run `eurotrain launch` on a SLURM login node") from None
    job_id = out.stdout.strip().split(";")[0]
    if out.returncode != 0 and not (wait and job_id):
        raise ValueError(f"sbatch failed ({out.returncode}): {out.stderr.strip()}")
    (Path(p.request.log_dir) / f"{p.job_name}-{job_id}.sbatch").write_text(script)
    if wait and out.returncode != 0:
        raise RuntimeError(f"job {job_id} failed (sbatch --wait exit {out.returncode})")
    return job_id


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="eurotrain launch",
        description="Render (and submit) an sbatch job that trains CONFIG on a EuroHPC machine. "
        "Launch options come before CONFIG; everything after CONFIG is a config override.",
    )
    ap.add_argument("--cluster", required=True, help="profile name (launch/clusters/NAME.yaml)")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--time", required=True, help="walltime [D-]HH:MM:SS")
    ap.add_argument("--account", help="project account to charge")
    ap.add_argument("--partition", help="a queue name from the profile (default: its default)")
    ap.add_argument("--container", help="Apptainer/Singularity image to run the ranks in")
    ap.add_argument("--gpus-per-node", type=int, help="GPUs (ranks) per node (default: all)")
    ap.add_argument("--launcher", choices=("srun", "torchrun"), default="srun")
    ap.add_argument("--python", help="python on the compute nodes (default: this one, or "
                    "python3 inside --container)")  # fmt: skip
    ap.add_argument("--job-name", help="default: eurotrain-<model.name>")
    ap.add_argument("--log-dir", default="logs", help="job logs go to LOG_DIR/<job>-<id>.out")
    ap.add_argument("--signal-seconds", type=int, default=300,
                    help="USR1 this many seconds before the walltime")  # fmt: skip
    ap.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    ap.add_argument("--wait", action="store_true", help="sbatch --wait: block until the job ends")
    ap.add_argument("config", help="training config (YAML)")
    ap.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key value ...")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    python = args.python or ("python3" if args.container else sys.executable)
    req = LaunchRequest(
        cluster=args.cluster, nodes=args.nodes, time=args.time, config=args.config,
        overrides=list(args.overrides), account=args.account, partition=args.partition,
        container=args.container, gpus_per_node=args.gpus_per_node, launcher=args.launcher,
        python=python, job_name=args.job_name, log_dir=args.log_dir,
        signal_seconds=args.signal_seconds,
    )  # fmt: skip
    try:
        p = plan(req)
        script = render(p)
        if args.dry_run:
            print(script, end="")
            return 0
        job_id = submit(p, script, wait=args.wait)
    except (ValueError, RuntimeError) as e:
        print(f"eurotrain launch: {e}", file=sys.stderr)
        return 2
    print(f"submitted job {job_id}: {p.world_size} ranks on {req.nodes} x {p.profile.name}; "
          f"log {req.log_dir}/{p.job_name}-{job_id}.out")  # fmt: skip
    return 0
