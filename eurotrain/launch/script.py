"""The sbatch script of a checked ``Plan``: deterministic (no timestamps, no host-specific paths
unless asked for), so it can be reviewed and compared against golden files.

A user's text is data in the script, never shell: every word of the ranks' command that comes
from the user (python, container, config path, overrides) is single-quoted (shlex.quote), and
the only words the job's shell expands are eurotrain's own (the rendezvous words below) and
profile values that clusters.py has checked to reference plain variables. #SBATCH values are
not shell at all but sbatch's own syntax, so there the characters sbatch reads specially are
refused (request.py); control characters are refused everywhere. docs/launch.md lists what and
why.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from eurotrain import chain
from eurotrain.clusters import sbatch_problem
from eurotrain.container import Bind
from eurotrain.distributed import PORT_BASE, PORT_SPAN
from eurotrain.launch.request import Plan


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
    if "TRITON_CACHE_DIR" not in env:
        # Triton's default is ~/.triton/cache: every rank of every node compiling into $HOME on
        # the shared file system (small quotas, slow metadata). A value set at submission wins.
        lines.append('export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton-cache-$(id -u)}"')
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
