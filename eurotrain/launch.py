"""``eurotrain launch``: render a cluster profile and a training config into an sbatch script.

Everything that can be wrong is checked before anything is submitted: the cluster name, GPUs
per node, walltime against the queue's limit, nodes against the queue's size, the account, the
config itself, and whether its parallel layout and batch fit nodes x GPUs. The rendered script
is deterministic (no timestamps, no host-specific paths unless asked for) so it can be reviewed
and compared against golden files.

Two ways to start the ranks, both inside one sbatch allocation:
  srun      one task per GPU, CPU binding from the profile; ranks read SLURM_PROCID etc.
  torchrun  one task per node running torchrun with a c10d rendezvous on the first node.

A user's text is data in the script, never shell: every word of the ranks' command that comes
from the user (python, container, config path, overrides) is single-quoted (shlex.quote), and
the only words the job's shell expands are eurotrain's own (the rendezvous words below) and
profile values that clusters.py has checked to reference plain variables. #SBATCH values are
not shell at all but sbatch's own syntax, so there the characters sbatch reads specially are
refused; control characters are refused everywhere. docs/launch.md lists what and why.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from eurotrain import chain
from eurotrain.clusters import (
    ClusterProfile,
    Queue,
    control_character,
    load_profile,
    parse_walltime,
    profile_listing,
    sbatch_problem,
)
from eurotrain.container import Bind, binds
from eurotrain.distributed import PORT_BASE, PORT_SPAN
from eurotrain.errors import ConfigError, EurotrainError

if TYPE_CHECKING:
    from eurotrain.config import Config

SIGNAL_MAX_SECONDS = 65535
"""The latest warning `sbatch --signal=...@SECONDS` accepts."""


class LaunchError(EurotrainError, ValueError):
    """A launch option that cannot make a working job; the message names it and the fix."""

    exit_code = 2
    label = "error"
    every_rank = False  # `eurotrain launch` is one process: it always reports its own error


class JobFailedError(EurotrainError, RuntimeError):
    """`--wait`: the submitted job ended unsuccessfully (its log says why)."""

    label = "job failed"
    every_rank = False


@dataclass
class LaunchRequest:
    cluster: str
    nodes: int
    time: str
    config: str | None
    """The training config (YAML); None only for a --bench comms job."""
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
    chain: int = 1
    """Jobs in the chain (the first one and its requeues); 0: until the run is done."""
    spare_nodes: int = 0
    bench: str | None = None
    """Instead of training: "train" (a node sweep, `eurotrain bench train`) or "comms"."""
    bench_args: list[str] = field(default_factory=list)
    """Options of that `eurotrain bench` command (--nodes 1,2,4, --sizes ...)."""
    cpu_bind: str | None = None
    """srun --cpu-bind for the ranks; None: the profile's."""


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
    binds: list[Bind] = field(default_factory=list)
    """With --container: the host paths the run uses (eurotrain/container.py)."""
    max_restarts: int = 0
    """fault.max_restarts of the config: restarts inside the job (eurotrain/chain.py)."""
    notes: list[str] = field(default_factory=list)
    """What the user should know about the job (printed on stderr; nothing refused)."""


def plan(req: LaunchRequest) -> Plan:
    """Check a request against its cluster profile and its config; raise LaunchError (or the
    config's ConfigError) if it could not make a working job."""
    _check_text(req)
    profile = load_profile(req.cluster)
    if req.nodes < 1:
        raise LaunchError(f"--nodes {req.nodes}: must be >= 1")
    gpus = profile.gpus_per_node if req.gpus_per_node is None else req.gpus_per_node
    if not 1 <= gpus <= profile.gpus_per_node:
        raise LaunchError(
            f"--gpus-per-node {gpus}: {profile.name} nodes have {profile.gpus_per_node} "
            f"{'GPUs' if profile.accelerator.vendor != 'cpu' else 'rank slots'} "
            f"({profile.accelerator.model}); choose 1..{profile.gpus_per_node}"
        )
    if req.launcher not in ("srun", "torchrun"):
        raise LaunchError(f"--launcher {req.launcher!r}: choose srun or torchrun")
    queue_name, queue = profile.queue(req.partition)
    seconds = _walltime_seconds(req)
    if req.chain < 0 or req.spare_nodes < 0:
        raise LaunchError(f"--chain {req.chain} / --spare-nodes {req.spare_nodes}: must be >= 0")
    _check_queue_limits(profile, queue_name, queue, req.nodes + req.spare_nodes, seconds, req.time)
    if profile.account_required and req.account is None:
        example = (
            f" (accounts here look like {profile.account_example})"
            if profile.account_example
            else ""
        )
        raise LaunchError(
            f"{profile.name} needs a project account: pass --account ACCOUNT{example}; "
            f"`sacctmgr show assoc user=$USER` or the centre's portal lists yours"
        )
    world = req.nodes * gpus
    cuda = profile.accelerator.vendor != "cpu"
    cfg: Config | None = None
    if req.bench is not None:
        if req.chain != 1:
            raise LaunchError("--chain/--until-done: a chain trains; leave it out with --bench")
        layout, name, cfg = _check_bench(req, gpus, cuda)
    else:
        layout, cfg = _check_config(req, world, cuda=cuda)
        name = cfg.model.name
        if req.chain != 1 and cfg.checkpoint.interval == 0:
            raise LaunchError(
                f"--chain/--until-done: {req.config} saves no checkpoints (checkpoint.interval "
                f"0), so each job would start over: set checkpoint.interval (a number of steps, "
                f"or auto)"
            )
    run_binds = []
    if req.container is not None and cfg is not None and req.config is not None:
        log_dir = req.log_dir if req.bench is None else None  # the job-state file
        run_binds = binds(cfg, req.config, profile.container.binds, log_dir)
    train_args = [req.config] if req.config is not None else []
    if profile.accelerator.vendor == "cpu":
        train_args += ["--train.device", "cpu"]
    if profile.accelerator.peak_bf16_tflops:
        train_args += ["--train.peak_tflops", f"{profile.accelerator.peak_bf16_tflops:g}"]
    auto = cfg is not None and cfg.checkpoint.interval == "auto" and not cfg.fault.mtbf_hours
    if auto and profile.node_mtbf_hours:
        mtbf = profile.node_mtbf_hours / req.nodes  # any node failing stops the job
        train_args += ["--fault.mtbf_hours", f"{mtbf:.6g}"]
    train_args += req.overrides
    job_name = req.job_name if req.job_name is not None else _default_job_name(name)
    # With --bench, cfg is the swept config (its restarts are not used: no chain, no restart).
    max_restarts = cfg.fault.max_restarts if cfg is not None and req.bench is None else 0
    notes = []
    if cfg is not None and req.bench is None and req.chain != 1:
        timeout = cfg.fault.collective_timeout_s
        if timeout >= req.signal_seconds:
            notes.append(
                f"fault.collective_timeout_s {timeout:g} s is not shorter than --signal-seconds "
                f"{req.signal_seconds}: a rank that hangs less than that before the walltime is "
                f"noticed only when SLURM ends the job, and the chain ends with it; lower the "
                f"timeout or raise --signal-seconds"
            )
    return Plan(
        profile, req, queue_name, queue, gpus, world, layout, job_name, train_args, run_binds,
        max_restarts, notes,
    )  # fmt: skip


def _check_text(req: LaunchRequest) -> None:
    """Refuse what a user's text could do to the script: control characters anywhere; in an
    #SBATCH value also what sbatch reads specially (see clusters.sbatch_problem)."""
    sbatch_values = {"--account": req.account, "--partition": req.partition,
                     "--job-name": req.job_name, "--log-dir": req.log_dir}  # fmt: skip
    for option, value in sbatch_values.items():
        problem = None if value is None else sbatch_problem(value)
        if problem:
            raise LaunchError(f"{option} {value!r}: {problem}; choose another value")
    if req.job_name and "/" in req.job_name:
        raise LaunchError(
            f"--job-name {req.job_name!r}: contains '/'; the log is LOG_DIR/%x-%j.out, where %x "
            f"is the job name, so the name must not hold a directory: choose one without '/'"
        )
    words = {"--cluster": req.cluster, "--time": req.time, "--python": req.python,
             "--container": req.container, "--cpu-bind": req.cpu_bind,
             "config": req.config}  # fmt: skip
    extra = [*(("config override", w) for w in req.overrides),
             *(("bench option", w) for w in req.bench_args)]  # fmt: skip
    for what, word in [*words.items(), *extra]:
        if word is None:
            continue
        if word == "" and what in ("--python", "--container", "--cpu-bind", "config"):
            raise LaunchError(f"{what} '': empty; give a value or leave the option out")
        control = control_character(word)
        if control:
            raise LaunchError(
                f"{what} {word!r}: contains {control}; control characters are refused in "
                f"everything that goes into a job script"
            )


def _walltime_seconds(req: LaunchRequest) -> int:
    """--time in seconds, checked together with --signal-seconds, the warning inside it."""
    try:
        seconds = parse_walltime(req.time)  # digits, '-' and ':' only: safe in #SBATCH
    except ConfigError:
        raise LaunchError(
            f"--time {req.time!r}: not a SLURM walltime [D-]HH:MM:SS (for example 02:00:00 or "
            f"1-12:00:00)"
        ) from None
    if seconds == 0:
        raise LaunchError(
            f"--time {req.time}: a job needs a walltime above zero (SLURM reads a zero time as "
            f"no time limit); give the time the job needs"
        )
    warn = req.signal_seconds
    if not 1 <= warn <= SIGNAL_MAX_SECONDS:
        raise LaunchError(
            f"--signal-seconds {warn}: must be at least 1 (the ranks need the warning to save a "
            f"final checkpoint)" if warn < 1 else
            f"--signal-seconds {warn}: SLURM takes at most {SIGNAL_MAX_SECONDS}; choose fewer"
        )  # fmt: skip
    if warn >= seconds:
        raise LaunchError(
            f"--signal-seconds {warn} is not shorter than --time {req.time} ({seconds} s): the "
            f"warning would come before the job starts; choose fewer seconds or a longer --time"
        )
    return seconds


def _check_queue_limits(
    profile: ClusterProfile, name: str, queue: Queue, nodes: int, seconds: int, time: str
) -> None:
    """Every limit the profile knows for the queue; a limit it does not know is not checked.
    A suggested other queue is one whose known limits admit both nodes and time."""
    qos = f", qos {queue.qos}" if queue.qos else ""
    if queue.max_time and seconds > parse_walltime(queue.max_time):
        other = _queue_that_admits(profile, nodes, seconds, lambda q: bool(q.max_time))
        raise LaunchError(
            f"--time {time} exceeds the {queue.max_time} limit of {profile.name} queue {name!r} "
            f"(partition {queue.partition}{qos}): shorten the job and resume from a checkpoint"
            + (f", or use --partition {other}" if other else "")
        )
    if nodes < queue.min_nodes or (queue.max_nodes and nodes > queue.max_nodes):
        above = bool(queue.max_nodes) and nodes > queue.max_nodes
        other = _queue_that_admits(
            profile, nodes, seconds, (lambda q: bool(q.max_nodes)) if above else (lambda q: True)
        )
        limit = (
            f"{queue.min_nodes}..{queue.max_nodes}"
            if queue.max_nodes
            else f"at least {queue.min_nodes} (its largest size is unknown)"
        )
        raise LaunchError(
            f"--nodes {nodes}: {profile.name} queue {name!r} takes {limit} nodes"
            + (f"; --partition {other} takes {nodes} nodes" if other else "")
        )


def _queue_that_admits(
    profile: ClusterProfile, nodes: int, seconds: int, knows: Callable[[Queue], bool]
) -> str | None:
    """The first queue whose limits admit the job, among those that `knows` the limit in
    question (a queue is never suggested on the strength of a limit nobody wrote down)."""
    for name, q in profile.queues.items():
        if knows(q) and q.admits(nodes, seconds):
            return name
    return None


def _check_config(req: LaunchRequest, world: int, cuda: bool) -> tuple[str, Config]:
    """The config loads and its layout and batch fit `world` ranks: the same check_layout the
    trainer runs first on every rank, so a job is refused here rather than after it queued.
    Returns the layout and the config."""
    from eurotrain.config import load_config
    from eurotrain.parallel.checks import check_layout

    try:
        cfg = load_config(req.config, req.overrides)
        dims = check_layout(cfg, world, cuda=cuda)
    except ConfigError as e:
        raise ConfigError(f"{req.config} on {req.nodes} node(s) ({world} ranks): {e}") from None
    return dims.describe(), cfg


def _check_bench(req: LaunchRequest, gpus: int, cuda: bool) -> tuple[str, str, Config | None]:
    """A benchmark job: a sweep's every size fits the config (checked as the trainer will);
    comms needs no config. Returns what the script's comment and job name show, and the config."""
    if req.bench == "comms":
        return "collectives", "comms", None
    if req.bench != "train" or req.config is None:
        raise LaunchError(f"--bench {req.bench!r}: choose train (with a CONFIG) or comms")
    from eurotrain.bench.sweep import parse_nodes, plan_sizes

    option = dict(zip(req.bench_args[::2], req.bench_args[1::2]))
    nodes = parse_nodes(option.get("--nodes", str(req.nodes)))
    if max(nodes) > req.nodes:
        raise LaunchError(
            f"--sweep {','.join(map(str, nodes))}: the job has --nodes {req.nodes}; ask for "
            f"--nodes {max(nodes)} or sweep fewer"
        )
    sizes = plan_sizes(req.config, req.overrides, nodes, gpus, option.get("--mode", "weak"), cuda)
    from eurotrain.config import load_config

    cfg = load_config(req.config, req.overrides)
    sweep = f"sweep over {', '.join(str(s.nodes) for s in sizes)} node(s)"
    return sweep, f"bench-{cfg.model.name}", cfg


def _default_job_name(model_name: str) -> str:
    """eurotrain-<model.name>, with what may not stand in a job name (see _check_text) made '-'."""
    control = control_character(model_name)
    if control:
        raise LaunchError(
            f"model.name {model_name!r}: contains {control}, and it names the job; fix the "
            f"config or pass --job-name"
        )
    return "eurotrain-" + re.sub(r"[^A-Za-z0-9._-]", "-", model_name)


# ---- rendering ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Expanded:
    """A word the job's shell expands, written in double quotes. Only eurotrain's own constants
    below and profile values that clusters.py checked (plain $NAME references) become one; a
    user's word is always a plain str, which is single-quoted."""

    text: str


@dataclass(frozen=True)
class _InWorkdir:
    """A user's relative path anchored at the job's working directory: "$PWD"/'PATH' (the
    path single-quoted like every user word; "$PWD" is eurotrain's own)."""

    path: str


RDZV_ENDPOINT = _Expanded("$MASTER_ADDR:$MASTER_PORT")
RDZV_ID = _Expanded("$SLURM_JOB_ID")
WORKDIR = _Expanded("$PWD")

Word = str | _Expanded | _InWorkdir


def _profile_word(value: str) -> Word:
    return _Expanded(value) if "$" in value else value


def _bind_word(bind: Bind) -> Word:
    if not bind.relative:
        return bind.path
    return WORKDIR if bind.path == "." else _InWorkdir(bind.path)


def _shell_word(word: Word) -> str:
    if isinstance(word, _InWorkdir):
        return _shell_word(WORKDIR) + "/" + shlex.quote(word.path)
    if isinstance(word, _Expanded):
        escaped = word.text.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`")
        return f'"{escaped}"'
    return shlex.quote(word)


def _shell_words(words: Sequence[Word]) -> str:
    return " ".join(_shell_word(w) for w in words)


def _sbatch_header(p: Plan) -> list[str]:
    prof, req = p.profile, p.request
    per_node = 1 if req.launcher == "torchrun" else p.gpus_per_node
    cpus = prof.cpus_per_task * (p.gpus_per_node if req.launcher == "torchrun" else 1)
    opts = [f"--job-name={p.job_name}"]
    if req.account is not None:
        opts.append(f"--account={req.account}")
    opts.append(f"--partition={p.queue.partition}")
    if p.queue.qos:
        opts.append(f"--qos={p.queue.qos}")
    opts += [
        f"--nodes={req.nodes + req.spare_nodes}",
        f"--ntasks-per-node={per_node}",
        f"--cpus-per-task={cpus}",
    ]
    if prof.gpu_request == "gres":
        opts.append(f"--gres=gpu:{p.gpus_per_node}")
    elif prof.gpu_request == "gpus-per-node":
        opts.append(f"--gpus-per-node={p.gpus_per_node}")
    opts += [
        f"--time={req.time}",
        # SLURM expands %-patterns in --output: %% keeps a '%' of the directory's name literal.
        f"--output={req.log_dir.replace('%', '%%')}/%x-%j.out",
        # SLURM warns this shell before the walltime; the trap below passes it to the ranks,
        # which checkpoint and stop (eurotrain's fault handling).
        f"--signal=B:USR1@{req.signal_seconds}",
        *chain.header_lines(req.chain),
    ]
    opts += prof.sbatch_extra
    # plan() and the profile's own checks let no value through that sbatch would misread.
    assert all(sbatch_problem(o) is None for o in opts), opts
    return [f"#SBATCH {o}" for o in opts]


def _rank_command(p: Plan) -> list[Word]:
    """The command every rank (srun) or every node (torchrun) runs, container included."""
    req = p.request
    cmd: list[Word]
    if req.launcher == "torchrun":
        cmd = [
            req.python, "-m", "torch.distributed.run",
            "--nnodes", str(req.nodes), "--nproc-per-node", str(p.gpus_per_node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", RDZV_ENDPOINT,
            "--rdzv-id", RDZV_ID, "--max-restarts", "0",
            "-m", "eurotrain.train", *p.train_args,
        ]  # fmt: skip
    elif req.bench == "comms":
        cmd = [req.python, "-m", "eurotrain", "bench", "comms", "--cluster", p.profile.name,
               *req.bench_args]  # fmt: skip
    else:
        cmd = [req.python, "-m", "eurotrain.train", *p.train_args]
    if req.launcher == "torchrun" and req.bench == "comms":
        cmd = [*cmd[: cmd.index("eurotrain.train")], "eurotrain", "bench", "comms",
               "--cluster", p.profile.name, *req.bench_args]  # fmt: skip
    if req.container is not None:
        c = p.profile.container
        binds: list[Word] = ["--bind", _profile_word(",".join(c.binds))] if c.binds else []
        for bind in p.binds:  # the run's own directories, one --bind each
            binds += ["--bind", _bind_word(bind)]
        cmd = [c.runtime, "exec", *c.flags, *binds, req.container, *cmd]
    return cmd


def _export(name: str, value: str) -> str:
    """export NAME=VALUE from a profile; its $VARIABLES stay expandable (double quotes)."""
    return f"export {name}={_shell_word(_profile_word(value))}"


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
    if req.container is not None and prof.container.setup:
        lines += [f"# Container runtime ({prof.container.runtime})", *prof.container.setup, ""]
    made = [b.path for b in p.binds if b.writable]
    if made:  # a bind whose source is missing stops the container runtime
        lines += ["# Directories the run writes, bound into the container",
                  "mkdir -p -- " + _shell_words(list(made)), ""]  # fmt: skip
    if prof.comm.env:
        lines.append(f"# Communication: {prof.comm.library.upper()} on this network")
        lines += [_export(k, v) for k, v in prof.comm.env.items()]
        lines.append("")
    env = {**prof.env, "OMP_NUM_THREADS": str(prof.cpus_per_task), "PYTHONUNBUFFERED": "1"}
    lines.append("# Every rank")
    lines += [_export(k, v) for k, v in env.items()]
    lines.append("")
    if prof.master_addr == "nodeaddr":  # the rendezvous on the first node of each start
        master = "MASTER_ADDR=$(scontrol show node \"$head_node\" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')"
    else:
        master = "MASTER_ADDR=$head_node"
    if req.bench is not None:
        # A benchmark is no training run: no restarts, no chain; one rendezvous for the job.
        lines += [
            "# Rendezvous: the allocation's first node, a port derived from the job id",
            # sed reads the whole list: `head -n 1` would exit early, and on a long node list
            # scontrol would then die of SIGPIPE and fail the job (set -o pipefail).
            'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
            master,
            f"MASTER_PORT=$(({PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN}))",
            "export MASTER_ADDR MASTER_PORT",
            'echo "eurotrain: job $SLURM_JOB_ID, $SLURM_JOB_NUM_NODES node(s): $SLURM_JOB_NODELIST;'
            ' rendezvous $MASTER_ADDR:$MASTER_PORT"',
            "",
        ]
    if req.bench == "train":
        # The sweep runs one srun step per node count itself (eurotrain/bench/sweep.py).
        sweep: list[Word] = [req.python, "-m", "eurotrain", "bench", "train", "--cluster", prof.name,
                 "--gpus-per-node", str(p.gpus_per_node), *req.bench_args,
                 *p.train_args]  # fmt: skip
        lines += ["# Scaling benchmark: one job step per node count", _shell_words(sweep), ""]
        return "\n".join(lines)
    srun = ["srun", "--kill-on-bad-exit=1"]
    if req.launcher == "torchrun":
        srun += ["--ntasks-per-node=1", f"--cpus-per-task={prof.cpus_per_task * p.gpus_per_node}"]
        lines.append("# One torchrun per node; it starts one worker per GPU.")
        name = "torchrun-node"
    else:
        srun += [
            f"--ntasks-per-node={p.gpus_per_node}",
            f"--cpus-per-task={prof.cpus_per_task}",
        ]
        cpu_bind = prof.cpu_bind if req.cpu_bind is None else req.cpu_bind
        if cpu_bind:
            srun.append(f"--cpu-bind={cpu_bind}")
        lines.append("# One task per GPU; each rank takes GPU number SLURM_LOCALID.")
        name = "eurotrain-rank"
    lines.append("# Ranks ignore USR1 until the trainer installs its handler (the default kills).")
    prefix = ["bash", "-c", 'trap "" USR1; exec "$@"', name]
    lines += chain.script_lines(
        chain_jobs=req.chain,
        max_restarts=p.max_restarts,
        nodes=req.nodes,
        tasks=req.nodes * (1 if req.launcher == "torchrun" else p.gpus_per_node),
        spare_nodes=req.spare_nodes,
        state_dir=_shell_word(req.log_dir),
        job_name=_shell_word(p.job_name),
        master_addr=master,
        port=(PORT_BASE, PORT_SPAN),
        srun=_shell_words(srun),
        command=_shell_words([*prefix, *_rank_command(p)]),
    )
    return "\n".join(lines)


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
        cpu_bind=args.cpu_bind,
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
