"""Checking a launch request before anything is submitted: the cluster name, GPUs per node,
walltime against the queue's limit, nodes against the queue's size, the account, the user's
text (what could break the script), the config itself, and whether its parallel layout and batch
fit nodes x GPUs. ``plan`` turns a checked request into a ``Plan`` that ``script.render`` writes.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from eurotrain.clusters import (
    ClusterProfile,
    Queue,
    control_character,
    load_profile,
    parse_walltime,
    sbatch_problem,
)
from eurotrain.container import Bind, binds
from eurotrain.errors import ConfigError, EurotrainError

if TYPE_CHECKING:
    from eurotrain.config import Config
    from eurotrain.parallel.dims import ParallelDims

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
    dry_run: bool = False
    """Only the script is wanted: a path the run reads that is not here, or prepared data that
    does not open, is a note, not an error (the script may be rendered away from the cluster's
    file systems)."""


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
    problem = ""  # with the data
    memory_note = ""
    if req.bench is not None:
        if req.chain != 1:
            raise LaunchError("--chain/--until-done: a chain trains; leave it out with --bench")
        layout, name, cfg = _check_bench(req, gpus, cuda)
    else:
        dims, cfg = _check_config(req, world, cuda=cuda)
        layout, name = dims.describe(), cfg.model.name
        acc = profile.accelerator
        if cuda and acc.memory_gib:  # a note, not a refusal: GPU peaks are modelled, unmeasured
            from eurotrain.plan.memory import over_memory

            try:
                memory_note = over_memory(cfg, dims, acc.memory_gib, acc.model)
            except ConfigError:  # a layout the planner cannot model (zero-bubble orders)
                memory_note = ""
        from eurotrain.data.pipeline import prepared_data_problem
        from eurotrain.offline import path_problems

        problem = "; ".join(path_problems(cfg)) or prepared_data_problem(cfg)
        if problem and not req.dry_run:
            raise ConfigError(f"{problem} (checked before submitting)")
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
    if memory_note:
        notes.append(memory_note)
    if problem:  # only a dry run gets here with one
        notes.append(f"{problem}; a submitted job would be refused here")
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


def _check_config(req: LaunchRequest, world: int, cuda: bool) -> tuple[ParallelDims, Config]:
    """The config loads and its layout and batch fit `world` ranks: the same check_layout the
    trainer runs first on every rank, so a job is refused here rather than after it queued.
    Returns the layout (its degrees) and the config."""
    from eurotrain.config import load_config
    from eurotrain.parallel.checks import check_layout

    try:
        cfg = load_config(req.config, req.overrides)
        dims = check_layout(cfg, world, cuda=cuda)
    except ConfigError as e:
        raise ConfigError(f"{req.config} on {req.nodes} node(s) ({world} ranks): {e}") from None
    return dims, cfg


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
