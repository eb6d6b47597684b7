"""The hang watchdog: a thread per rank, fed by step progress, that ends a stuck job.

Every step start and end (and each evaluation and committed checkpoint) is a beat. When a rank
sees no beat for ``fault.hang_timeout_s`` (automatic: ``hang_step_multiple`` x the longest pause
between beats so far, at least ``hang_min_s``), it

  1. writes the stacks of all its threads (faulthandler) to RUN_DIR/hangs/<job>/rank-NNNNN.txt;
  2. answers a roll call in the process group's store with the step it is in. The first rank
     there holds the roll call: ranks that do not answer are frozen or dead. A frozen rank on
     the caller's own node is woken with SIGCONT, on which faulthandler writes its stacks to a
     node-local file (registered at start) that the caller copies into the run directory;
  3. the caller prints one line naming the ranks (and hosts) that stopped, reports their nodes
     to the job script (eurotrain/chain.py) and writes hang.json; every rank then exits with
     code 3, a failure, so that the job script restarts the ranks from the last checkpoint.

When every rank answers, the ones behind the others (stuck outside collectives, e.g. in I/O)
are the ones named. A hang in the rank that holds the store (rank 0 under srun) leaves the store
silent as well; the line then says so.
"""

from __future__ import annotations

import contextlib
import faulthandler
import itertools
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch.distributed as dist

from eurotrain.callbacks import Callback, StepMetrics
from eurotrain.chain import HANG_EXIT_CODE, attempt, report, report_suspects
from eurotrain.fault.config import FaultConfig
from eurotrain.fault.peers import _ranks, node_name, with_deadline

if TYPE_CHECKING:
    from eurotrain.train import Trainer, TrainResult

_generation = itertools.count()


def hang_dir(run_dir: Path) -> Path:
    """Where this attempt's stacks go: RUN_DIR/hangs/job<ID>-<requeue>-attempt<N>."""
    job = os.environ.get("SLURM_JOB_ID", "local")
    requeue = os.environ.get("SLURM_RESTART_COUNT", "0")
    return run_dir / "hangs" / f"job{job}-{requeue}-attempt{attempt()}"


class HangWatchdog(Callback):
    def __init__(
        self,
        cfg: FaultConfig,
        rank: int,
        world_size: int,
        run_dir: Path,
        before_exit: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.dir = hang_dir(run_dir)
        self.before_exit = before_exit
        self.last = time.monotonic()
        self.step, self.where = 0, "starting"
        self.longest = 0.0
        self.steps_seen = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store: Any = None
        self._prefix = f"eurotrain/hang/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self._prefix += f"{next(_generation)}/"
        self._local: TextIO | None = None

    # ---- beats ---------------------------------------------------------------------------
    def beat(self, where: str, step: int) -> None:
        now = time.monotonic()
        if self.steps_seen:  # the first step (compilation, warm-up) sets no scale
            self.longest = max(self.longest, now - self.last)
        self.last, self.where, self.step = now, where, step

    def timeout(self) -> float:
        if self.cfg.hang_timeout_s > 0:
            return self.cfg.hang_timeout_s
        if not self.steps_seen:
            return max(self.cfg.hang_min_s, self.cfg.collective_timeout_s)
        return max(self.cfg.hang_min_s, self.cfg.hang_step_multiple * self.longest)

    def on_train_start(self, trainer: Trainer) -> None:
        self.beat("after step", trainer.state.step)
        if self.world_size > 1 and dist.is_initialized():
            self._store = dist.distributed_c10d._get_default_store()
            self._local = self._arm_frozen_dump()
            me = [self.rank, node_name(), socket.gethostname(), os.getpid(), self._local.name]
            self._store.append(self._prefix + "ranks", json.dumps(me) + "\n")
        self._thread = threading.Thread(target=self._watch, name="eurotrain-watchdog", daemon=True)
        self._thread.start()

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        self.beat("in step", step)

    def on_step_end(self, trainer: Trainer, step: int, metrics: StepMetrics) -> None:
        self.beat("after step", step)
        self.steps_seen += 1

    def on_eval_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        self.beat("after step", step)

    def on_checkpoint_saved(self, trainer: Trainer, step: int, path: str) -> None:
        self.beat(self.where, self.step)

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        self.close()

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        if self._local is not None:
            faulthandler.unregister(signal.SIGCONT)
            self._local.close()
            Path(self._local.name).unlink(missing_ok=True)
            self._local = None

    def _arm_frozen_dump(self) -> TextIO:
        """A node-local file that faulthandler fills with this rank's stacks when it receives
        SIGCONT: how a frozen rank, once woken, tells where it was."""
        job = os.environ.get("SLURM_JOB_ID", "local")
        name = f"eurotrain-stacks-{job}-{attempt()}-{self.rank}-{os.getpid()}.txt"
        f = open(Path(tempfile.gettempdir()) / name, "w+")  # noqa: SIM115 - closed in close()
        faulthandler.register(signal.SIGCONT, file=f, all_threads=True, chain=False)
        return f

    # ---- the watch -----------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout() / 4)):
            stale = time.monotonic() - self.last
            if stale > self.timeout():
                self._hang(stale)
                return

    def _hang(self, stale: float) -> None:
        self._dump(self.dir / f"rank-{self.rank:05d}.txt", stale)
        text: str | None = (
            f"no progress for {stale:.0f} s (hang timeout {self.timeout():g} s), "
            f"{self.where} {self.step}"
        )
        try:
            if self._store is not None:
                # Bounded: a frozen rank 0 keeps the store's connections open but silent.
                text = with_deadline(lambda: self._talk(str(text)), self._answer_s() + 15)
        except Exception:  # the store is silent: rank 0 (which holds it) is frozen or gone
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            text = (
                f"{text}, and the process group's store at {where} does not answer: rank 0 (or "
                f"its node) stopped; stacks in {self.dir}"
            )
        if text is not None:
            self._announce(text if self._store is not None else f"{text}; stacks in {self.dir}")
        if self.before_exit is not None:
            self.before_exit("hang")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(HANG_EXIT_CODE)

    def _talk(self, text: str) -> str | None:
        """Answer the roll call in the store; the first rank there holds it and gets the line
        to print (the others None)."""
        self._store.set_timeout(timedelta(seconds=10))
        mine = f"{self.rank}:{self.step}:{self.where},"
        with_deadline(lambda: self._store.append(self._prefix + "stale", mine), 10)
        if self._store.add(self._prefix + "caller", 1) == 1:
            return self._roll_call(text)
        self._wait_for_report()  # another rank reports (srun ends the rest at the first exit)
        return None

    def _dump(self, path: Path, stale: float) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            with open(path, "w") as f:
                f.write(
                    f"rank {self.rank} on {node_name()} (pid {os.getpid()}): no progress for "
                    f"{stale:.0f} s, {self.where} {self.step}\n"
                )
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)

    def _wait_for_report(self) -> None:
        deadline = time.monotonic() + self._answer_s() + 20
        while time.monotonic() < deadline:
            if self._store.check([self._prefix + "reported"]):
                return
            time.sleep(0.2)

    def _answer_s(self) -> float:
        """How long the caller waits for the others: they notice within a step and a poll."""
        return 5.0 + 2 * min(self.longest, 60.0)

    def _roll_call(self, message: str) -> str:
        store = self._store
        deadline = time.monotonic() + self._answer_s()
        while True:
            raw = store.get(self._prefix + "stale").decode()
            answers = {int(r): (int(s), w) for r, s, w in _triples(raw)}
            if len(answers) >= self.world_size or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        ranks = {}
        for line in store.get(self._prefix + "ranks").decode().splitlines():
            r, node, host, pid, local = json.loads(line)
            ranks[int(r)] = (str(node), str(host), int(pid), str(local))
        nodes = {r: v[0] for r, v in ranks.items()}
        silent = [r for r in range(self.world_size) if r not in answers]
        self._wake_frozen(silent, ranks)
        top = max((s for s, _ in answers.values()), default=0)
        behind = sorted(r for r, (s, _) in answers.items() if s < top)
        text = message + ": "
        if silent:
            text += f"{_ranks(silent, nodes)} stopped answering (frozen or dead)"
            suspects = silent
        elif behind:
            text += f"{_ranks(behind, nodes)} did not reach step {top} like the others"
            suspects = behind
        else:
            text += "every rank is stuck in the same step (a collective, or I/O on every node)"
            suspects = []
        text += f"; stacks in {self.dir}"
        report_suspects(nodes[r] for r in suspects if r in nodes)
        summary = {"step": self.step, "silent": silent, "behind": behind, "answers": answers,
                   "nodes": nodes, "message": text}  # fmt: skip
        with contextlib.suppress(OSError):
            (self.dir / "hang.json").write_text(json.dumps(summary, indent=1) + "\n")
        return text

    def _wake_frozen(self, silent: list[int], ranks: dict[int, tuple[str, str, int, str]]) -> None:
        """SIGCONT to the silent ranks on this host: faulthandler writes their stacks to their
        node-local files, which are copied into the run directory."""
        here = socket.gethostname()
        woken = []
        for r in silent:
            node, host, pid, local = ranks.get(r, ("", "", 0, ""))
            if host == here and pid > 0:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGCONT)
                    woken.append((r, node, Path(local)))
        deadline = time.monotonic() + 5
        for r, node, dump in woken:
            size = -1
            while time.monotonic() < deadline:
                now = dump.stat().st_size if dump.exists() else 0
                if now and now == size:
                    break
                size = now
                time.sleep(0.1)
            # Stopped again: a woken rank would go on with the step it froze in, and the job
            # would train on while this rank reports the hang and exits.
            with contextlib.suppress(OSError):
                os.kill(ranks[r][2], signal.SIGSTOP)
            try:
                text = dump.read_text(errors="replace")
                (self.dir / f"rank-{r:05d}.txt").write_text(
                    f"rank {r} on {node}: frozen (it did not answer); woken with SIGCONT, its "
                    f"stacks then:\n{text}"
                )
            except OSError:
                pass

    def _announce(self, text: str) -> None:
        line = f"eurotrain: rank {self.rank}: hang: {text}; exiting (code {HANG_EXIT_CODE}) so "
        line += "that the job restarts from the last checkpoint"
        print(line, file=sys.stderr, flush=True)
        report(f"error retry hang: {text}")
        if self._store is not None:
            with contextlib.suppress(Exception):
                with_deadline(lambda: self._store.set(self._prefix + "reported", "1"), 10)


def _triples(raw: str) -> list[tuple[str, str, str]]:
    out = []
    for item in raw.split(","):
        parts = item.split(":")
        if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
            out.append((parts[0], parts[1], parts[2]))
    return out
