"""Job chains and restarts inside an allocation: the loop of an `eurotrain launch` job script,
and what the ranks tell it.

The job script (rendered by ``supervisor_lines`` below) starts the ranks with srun and waits:

    ranks end, run finished (train.steps reached)  -> the job ends; so does the chain
    ranks end at the walltime warning (USR1)       -> the job requeues itself (``--chain N`` or
                                                      ``--until-done``) if this job committed a
                                                      checkpoint, else the chain ends
    ranks fail (crash, lost node, watchdog)        -> restart from the last committed checkpoint,
                                                      up to fault.max_restarts times, leaving the
                                                      failing node out when a spare node exists;
                                                      then as at the walltime warning
    configuration or input error (exit 2), or an   -> the job ends with the message above it; no
    error that a restart would only repeat            restart, no requeue

The ranks report to the script through a small append-only file, one line per event, named by
``EUROTRAIN_JOB_STATE`` (LOG_DIR/JOBNAME-JOBID.state, next to the job's log):

    checkpoint STEP        a checkpoint was committed (the job made progress)
    done STEP              the run reached train.steps
    stopped STEP           the run stopped at a signal, with its final checkpoint
    error fatal|retry MSG  the run failed; fatal: a restart would repeat it (bad config or data,
                           diverged, disk full), retry: it may not (a lost peer, a bug)
    suspect NODE           a node whose ranks stopped answering (PeerWatch, the hang watchdog)
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from eurotrain.callbacks import Callback
from eurotrain.errors import CollectiveError, EurotrainError, describe

if TYPE_CHECKING:
    from collections.abc import Iterable

    from eurotrain.train import Trainer, TrainResult

STATE_ENV = "EUROTRAIN_JOB_STATE"
"""The job-state file the job script reads (set by the script; unset outside one)."""
ATTEMPT_ENV = "EUROTRAIN_ATTEMPT"
"""Which start of the ranks inside this job this is: 0, then 1, 2, ... after restarts."""
JOB_START_ENV = "EUROTRAIN_JOB_START"
"""When the job script started (Unix time): the start-up of the first attempt counts from it."""
HANG_EXIT_CODE = 3
"""The exit code of a rank whose watchdog found a hang (a failure: the script restarts)."""
_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def report(line: str) -> None:
    """Append one event line for the job script; a no-op outside a job script. Never raises:
    the report must not be what fails a run."""
    path = os.environ.get(STATE_ENV)
    if not path:
        return
    text = " ".join(line.split())[:1000] + "\n"  # one line, whatever the message held
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, text.encode("utf-8", "replace"))
        finally:
            os.close(fd)
    except OSError:
        pass


def report_suspects(nodes: Iterable[str]) -> None:
    for node in sorted(set(nodes)):
        if _NODE.match(node):  # a node name the script may pass to srun --exclude
            report(f"suspect {node}")


def is_fatal(error: BaseException) -> bool:
    """Whether restarting would only repeat the error: every error a user must fix, except a
    lost or silent peer (a node can die and the next start goes on)."""
    return isinstance(error, EurotrainError) and not isinstance(error, CollectiveError)


def report_error(error: BaseException) -> None:
    kind = "fatal" if is_fatal(error) else "retry"
    report(f"error {kind} {describe(error) or type(error).__name__ + ': ' + str(error)}")


def attempt() -> int:
    value = os.environ.get(ATTEMPT_ENV, "0")
    return int(value) if value.isascii() and value.isdigit() else 0  # not "²": isdigit() only


class JobStateReport(Callback):
    """Tells the job script (rank 0) of committed checkpoints and how the run ended."""

    def __init__(self, is_main: bool) -> None:
        self.is_main = is_main

    def on_checkpoint_saved(self, trainer: Trainer, step: int, path: str) -> None:
        if self.is_main:
            report(f"checkpoint {step}")

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        if self.is_main:
            done = trainer.state.step >= trainer.cfg.train.steps
            report(f"{'done' if done else 'stopped'} {trainer.state.step}")


# ---- the job script ----------------------------------------------------------------------
def header_lines(chain_jobs: int) -> list[str]:
    """#SBATCH options a chain needs: requeueable, and one log that requeued runs append to."""
    return [] if chain_jobs == 1 else ["--requeue", "--open-mode=append"]


def script_lines(
    *,
    chain_jobs: int,
    max_restarts: int,
    nodes: int,
    tasks: int,
    spare_nodes: int,
    state_dir: str,
    job_name: str,
    master_addr: str,
    port: tuple[int, int],
    srun: str,
    command: str,
) -> list[str]:
    """The job script from the rendezvous on: start the ranks, wait, then finish, restart or
    requeue (see the module docstring). ``state_dir`` is the quoted log directory and
    ``job_name`` the quoted job name (the state file sits next to the log), ``srun`` the
    srun command and its options, ``command`` what each task runs (both quoted already),
    ``master_addr`` the line that sets MASTER_ADDR from $head_node."""
    chain = "0  # --until-done" if chain_jobs == 0 else f"{chain_jobs}"
    # With spare nodes the ranks' nodes are named (and srun must not take the job's task count).
    placement = f' --nodes={nodes} --ntasks={tasks} --nodelist="$step_nodes"' if spare_nodes else ""
    return [
        "# The ranks report to the job-state file; on failure they restart from the last checkpoint",
        "# (up to fault.max_restarts times, leaving failing nodes out while spare nodes last); at",
        "# the walltime warning they save and stop, and a chain requeues the job (eurotrain/chain.py).",
        f"max_restarts={max_restarts}",
        f"chain_jobs={chain}",
        f"nodes={nodes}",
        f"spare_nodes={spare_nodes}",
        f"mkdir -p {state_dir}",
        f'job_state="$(cd {state_dir} && pwd)"/{job_name}-"$SLURM_JOB_ID.state"',
        "EUROTRAIN_JOB_START=$(date +%s.%N)",
        "export EUROTRAIN_JOB_STATE=$job_state EUROTRAIN_JOB_START",
        'echo "job ${SLURM_RESTART_COUNT:-0} start $EUROTRAIN_JOB_START" >>"$job_state"',
        'job_line=$(wc -l <"$job_state")',
        'echo "eurotrain: job $SLURM_JOB_ID (requeue ${SLURM_RESTART_COUNT:-0}) starts at'
        ' $EUROTRAIN_JOB_START on $SLURM_JOB_NUM_NODES node(s): $SLURM_JOB_NODELIST"',
        "",
        'stopping=0 ranks=""',
        "on_usr1() {",
        "    stopping=1",
        '    echo "eurotrain: walltime warning (USR1), passing it on"',
        '    [ -n "$ranks" ] || return 0',
        '    kill -USR1 "$ranks" 2>/dev/null || true',
        "    # A rank still starting ignores it: pass it on again for a minute.",
        '    (for _ in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 5; kill -USR1 "$1" 2>/dev/null ||'
        " exit 0; done) &",
        "}",
        "trap 'on_usr1 \"$ranks\"' USR1",
        "",
        "ended() {  # goodput.jsonl accounts for the time up to here",
        '    echo "eurotrain: job $SLURM_JOB_ID (requeue ${SLURM_RESTART_COUNT:-0}) ends at'
        ' $(date +%s.%N)"',
        "}",
        "",
        "requeue_or_end() {  # $1: what happened, $2: the exit code if the chain ends here",
        "    local jobs=$((${SLURM_RESTART_COUNT:-0} + 1))",
        '    if [ "$chain_jobs" -ne 0 ] && [ "$jobs" -ge "$chain_jobs" ]; then',
        '        echo "eurotrain: $1; job $jobs of a chain of $chain_jobs: submit again to go on'
        ' from the last checkpoint"',
        '        ended; exit "$2"',
        "    fi",
        '    if ! grep -q "^checkpoint " <<<"$(tail -n "+$((job_line + 1))" "$job_state")"; then',
        '        echo "eurotrain: $1, and this job committed no checkpoint: the chain ends rather'
        ' than requeue a job that makes no progress (see the errors above)"',
        "        ended; exit 1",
        "    fi",
        '    echo "eurotrain: $1: requeueing the job to go on from the last checkpoint"',
        "    ended",
        '    scontrol requeue "$SLURM_JOB_ID"',
        "    sleep 300 & wait $!  # SLURM ends this run of the job now",
        "    exit 0",
        "}",
        "",
        'attempt=0 excluded=""',
        "while true; do",
        "    # The nodes of this start: the allocation's, without the excluded ones.",
        '    step_nodes="" count=0',
        '    for node in $(scontrol show hostnames "$SLURM_JOB_NODELIST"); do',
        '        case ",$excluded," in *",$node,"*) continue ;; esac',
        '        [ "$count" -lt "$nodes" ] || break',
        "        step_nodes=${step_nodes:+$step_nodes,}$node count=$((count + 1))",
        "    done",
        "    head_node=${step_nodes%%,*}",
        f"    {master_addr}",
        f"    MASTER_PORT=$(({port[0]} + (SLURM_JOB_ID + attempt) % {port[1]}))",
        "    EUROTRAIN_ATTEMPT=$attempt EUROTRAIN_ATTEMPT_START=$(date +%s.%N)",
        "    export MASTER_ADDR MASTER_PORT EUROTRAIN_ATTEMPT EUROTRAIN_ATTEMPT_START",
        '    echo "eurotrain: start $attempt on $step_nodes; rendezvous $MASTER_ADDR:$MASTER_PORT"',
        '    seen=$(wc -l <"$job_state") srun_log=$(mktemp)',
        f"    {srun}{placement} \\",
        f'        {command} 2> >(tee "$srun_log" >&2) &',
        "    ranks=$!",
        "    # wait returns early when the trap runs; keep waiting until srun itself ends.",
        "    while true; do",
        '        status=0; wait "$ranks" || status=$?',
        '        kill -0 "$ranks" 2>/dev/null || break',
        "    done",
        '    ranks="" events=$(tail -n "+$((seen + 1))" "$job_state")',
        '    if grep -q "^done " <<<"$events"; then',
        '        echo "eurotrain: the run reached train.steps: the job (and its chain) ends"',
        "        ended; exit 0",
        "    fi",
        '    if [ "$status" -eq 2 ] || grep -q "^error fatal " <<<"$events"; then',
        '        echo "eurotrain: the ranks stopped on an error a restart would repeat (above): no'
        ' restart, no requeue; fix it and submit again"',
        '        ended; exit "$((status == 0 ? 1 : status))"',
        "    fi",
        '    if [ "$stopping" = 1 ] || [ "$status" -eq 0 ]; then',
        '        requeue_or_end "the ranks stopped at the walltime warning" 0',
        "    fi",
        "    attempt=$((attempt + 1))",
        '    if [ "$attempt" -gt "$max_restarts" ]; then',
        '        requeue_or_end "the ranks failed (exit $status) $attempt times in this job"'
        ' "$status"',
        "    fi",
        "    sleep 1  # srun's last messages",
        "    # The failing node: as the ranks named it (a peer or hang report), else srun's first.",
        "    suspects=$(sed -n 's/^suspect \\([A-Za-z0-9][A-Za-z0-9._-]*\\)$/\\1/p'"
        ' <<<"$events" | sort -u | tr "\\n" " ")',
        "    suspects=${suspects% }",
        '    if [ -z "$suspects" ]; then',
        "        suspects=$(sed -n 's/^srun: error: \\([A-Za-z0-9][A-Za-z0-9._-]*\\): task"
        ' [0-9]*: .*/\\1/p\' "$srun_log" | sed -n 1p)',
        "    fi",
        '    rm -f "$srun_log"',
        "    for node in $suspects; do",
        '        case ",$excluded," in *",$node,"*) ;; *) excluded=${excluded:+$excluded,}$node ;;'
        " esac",
        "    done",
        "    # Only as many left out as there are spare nodes: the oldest suspects come back first.",
        '    while [ -n "$excluded" ] && [ "$(tr , "\\n" <<<"$excluded" | wc -l)" -gt'
        ' "$spare_nodes" ]; do',
        '        case $excluded in *,*) excluded=${excluded#*,} ;; *) excluded="" ;; esac',
        "    done",
        '    echo "eurotrain: the ranks failed (exit $status)${suspects:+ on node(s) $suspects}:'
        " restart $attempt of $max_restarts from the last checkpoint${excluded:+, without"
        ' $excluded}"',
        "done",
        "",
    ]
