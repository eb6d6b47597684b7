"""Naming the ranks that stopped answering when a collective fails.

When a collective fails (it timed out after ``fault.collective_timeout_s``, or a peer's
connection closed), PeerWatch holds a roll call in the process group's store: every rank that
is still running answers from a thread of its own (a rank blocked in a collective still runs
it), and the error names the ranks, with their hosts, that did not. Inside a job script of
`eurotrain launch` the nodes of those ranks are also reported to the script (eurotrain/chain.py),
which leaves them out of the restart when it can.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import torch.distributed as dist

from eurotrain.callbacks import Callback, StepMetrics
from eurotrain.chain import report_suspects
from eurotrain.errors import CollectiveError
from eurotrain.fault.inject import freeze_for_test

if TYPE_CHECKING:
    from eurotrain.train import Trainer, TrainResult


def node_name() -> str:
    """This rank's node as SLURM names it (what --exclude takes), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


# Messages of gloo's and the store's errors when a peer is gone or silent (NCCL's and the
# store's own errors are torch.distributed.DistError subclasses).
_LOST_PEER = ("Connection reset", "Connection closed", "Broken pipe", "Connection refused")
_TIMEOUT = ("Timed out", "timed out", "Application timeout")
_generation = itertools.count()
T = TypeVar("T")


def with_deadline(fn: Callable[[], T], seconds: float) -> T:
    """fn() in a thread of its own, or TimeoutError after ``seconds``. For the store: when the
    process that holds it is frozen (SIGSTOP), its connections stay open and a request can
    wait forever despite the store's timeout. A call that never returns is left behind in a
    daemon thread (the process is ending anyway)."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as e:  # handed to the caller
            box.append((False, e))

    thread = threading.Thread(target=run, name="eurotrain-store-call", daemon=True)
    thread.start()
    thread.join(seconds)
    if not box:
        raise TimeoutError(f"no answer within {seconds:g} s")
    ok, value = box[0]
    if not ok:
        raise value
    return value


def is_collective_failure(error: BaseException) -> bool:
    """Whether an error says a collective could not complete (a peer silent or gone)."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(m in text for m in _LOST_PEER + _TIMEOUT)


class PeerWatch(Callback):
    """A callback that turns a collective failure during training into a CollectiveError
    naming the ranks that stopped answering (its on_error raises it); alone (one rank) it does
    nothing. Also usable around any code as ``with PeerWatch(rank, world_size, timeout_s):``.

    Each rank records its host name in the default process group's store and polls a roll-call
    key every ``poll_s`` seconds from a thread; a rank that saw a collective fail sets that key
    and waits ``answer_s`` for the answers. Polling (not a blocking wait in the store) keeps
    the thread stoppable: it is joined before the process group goes away."""

    def __init__(self, rank: int, world_size: int, timeout_s: float) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.step = 0
        """The last completed step (on_step_end)."""
        self.first_step = 1
        # A roll call reaches every rank within a poll; polls load the store with
        # world_size / poll_s requests a second, so large jobs poll less often.
        self.poll_s = min(10.0, max(1.0, world_size / 500))
        self.answer_s = 2 * self.poll_s + 3
        # Keys of this watch only: after a torchrun restart (the agent's store lives on), or
        # with a second trainer in one process group, no rank reads an earlier roll call.
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self._prefix = f"eurotrain/peers/{restart}/{next(_generation)}/"
        self._store: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeerWatch:
        if self.world_size > 1 and dist.is_initialized():
            self._store = dist.distributed_c10d._get_default_store()
            self._store.append(self._prefix + "hosts", f"{self.rank}={node_name()}\n")
            self._thread = threading.Thread(
                target=self._answer_roll_call, name="eurotrain-peer-watch", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            # It polls every poll_s; a store request that never returns (the store's process
            # frozen) must not hold the error up: the thread is a daemon.
            self._thread.join(self.answer_s + self.poll_s)
            self._thread = None
        if exc is not None and self._store is not None and is_collective_failure(exc):
            raise self.describe_failure(exc) from exc

    def on_train_start(self, trainer: Trainer) -> None:
        self.step = trainer.state.step
        self.first_step = self.step + 1
        self.__enter__()

    def on_step_end(self, trainer: Trainer, step: int, metrics: StepMetrics) -> None:
        self.step = step
        freeze_for_test(self.rank, step, self.first_step)

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        self.__exit__(None, None, None)

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        self.__exit__(type(error), error, None)

    # ---- the roll call -------------------------------------------------------------------
    def _answer_roll_call(self) -> None:
        call = self._prefix + "roll_call"
        while not self._stop.wait(self.poll_s):
            try:
                if self._store.check([call]):
                    self._store.append(self._prefix + "alive", f"{self.rank}:{self.step + 1},")
                    return
            except Exception:  # the store is gone (the job is ending): nothing to answer
                return

    def _roll_call(self) -> tuple[dict[int, int], dict[int, str]] | None:
        """{rank: step} of the ranks that answered, and {rank: host}; None when the store
        itself does not answer."""
        try:
            return with_deadline(self._ask, self.answer_s + 10)
        except Exception:
            return None

    def _ask(self) -> tuple[dict[int, int], dict[int, str]]:
        store = self._store
        store.set_timeout(timedelta(seconds=self.answer_s))  # a silent store: an error
        store.append(self._prefix + "alive", f"{self.rank}:{self.step + 1},")
        store.set(self._prefix + "roll_call", str(self.step + 1))
        deadline = time.monotonic() + self.answer_s
        while True:
            raw = store.get(self._prefix + "alive").decode()
            alive = dict(_pair(item, ":") for item in raw.split(",") if item)
            if len(alive) >= self.world_size or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        raw = store.get(self._prefix + "hosts").decode()
        hosts = dict(_pair(line, "=") for line in raw.splitlines() if line)
        return {r: int(s) for r, s in alive.items()}, {r: h for r, h in hosts.items()}

    def describe_failure(self, error: BaseException) -> CollectiveError:
        step = self.step + 1
        timed_out = any(m in str(error) for m in (*_TIMEOUT, "timeout"))
        what = f"timed out after {self.timeout_s:g} s" if timed_out else "lost a peer"
        head = f"a collective {what} in step {step}"
        answers = self._roll_call()
        if answers is None:
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            return CollectiveError(
                f"{head}, and the process group's store at {where} does not answer either: "
                f"rank 0's node (or torchrun's agent there) stopped answering; look at its log, "
                f"then resubmit the job to resume from the last checkpoint"
            )
        alive, hosts = answers
        silent = [r for r in range(self.world_size) if r not in alive]
        if silent:
            report_suspects(hosts.get(r, "") for r in silent)  # for the job script's restart
            verb = "was" if len(alive) == 1 else "were"
            return CollectiveError(
                f"{head}: {_ranks(silent, hosts)} stopped answering; {_ranks(sorted(alive), hosts)} "
                f"{verb} waiting. Look at the log and the node of the rank that stopped (a crash, "
                f"an out-of-memory kill, a hang), then resubmit the job to resume from the last "
                f"checkpoint"
            )
        behind = {r: s for r, s in alive.items() if s != step}
        where = ", ".join(f"rank {r} in step {s}" for r, s in sorted(behind.items())[:8])
        return CollectiveError(
            f"{head}, yet all {self.world_size} ranks are still running"
            + (f" ({where})" if where else "")
            + f": a rank is stuck elsewhere (a hang, or collectives in another order) or slower "
            f"than fault.collective_timeout_s ({self.timeout_s:g} s) allows. Cause: "
            f"{_first_line(error)}"
        )


def _pair(item: str, sep: str) -> tuple[int, str]:
    key, _, value = item.partition(sep)
    return int(key), value


def _first_line(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _ranks(ranks: list[int], hosts: dict[int, str], shown: int = 8) -> str:
    """ "rank 1 (host node7)" or "ranks 0 (node6), 2 (node6) and 5 more"."""
    names = [f"{r} ({hosts.get(r, 'host unknown')})" for r in ranks[:shown]]
    more = f" and {len(ranks) - shown} more" if len(ranks) > shown else ""
    if len(ranks) == 1:
        return f"rank {ranks[0]} (host {hosts.get(ranks[0], 'unknown')})"
    return f"ranks {', '.join(names)}{more}"
