"""Goodput accounting: where the wall time of every job of a run went, in RUN_DIR/goodput.jsonl.

One record per start of the ranks (an "attempt": a job, or a restart inside it), written by
rank 0 when it ends. Its wall time [start, end] splits into categories that sum to it exactly:

    startup      job (or restart) start -> trainer built: srun, imports, rendezvous, data, model
    resume       loading the checkpoint the run resumes from
    productive   training steps that count
    checkpoint   the training thread's stall for checkpoints (staging; waiting for a save)
    eval         validation passes
    rollback     reloading a checkpoint after a loss spike or non-finite step
    lost         steps computed again: after a rollback, or after a crash since the last commit
    other        everything else (metrics, logging, the stop agreement, ...)

``gap_s`` is the time between the previous record's end and this start: a restart inside the
job (detection, tear-down, relaunch) or the queue between two jobs of a chain (``gap``:
"restart" or "queue"). A rank killed outright writes no record: rank 0 keeps a heartbeat
(RUN_DIR/.goodput-live.json, every few seconds and at each commit), and the next start turns it
into the record it never wrote (``end``: its last heartbeat, ``how``: "killed"), counting the
steps after the checkpoint it resumes from as lost.

Both files are read back as if from a stranger (a torn write, an older version, a hand edit):
``check_record`` checks every field used. A bad goodput.jsonl line is skipped and counted; a bad
heartbeat is set aside (``.goodput-live.json.bad``) with one warning, and the run goes on without
that attempt's record: an accounting file never stops a restart.

Components charge their own stalls through ``Ledger.span`` (the trainer owns one ledger); the
``GoodputRecorder`` callback times the steps and writes the records. ``summarize`` is what
``eurotrain status`` prints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eurotrain.callbacks import Callback, StepMetrics
from eurotrain.chain import JOB_START_ENV, attempt
from eurotrain.errors import shown, unreadable

if TYPE_CHECKING:
    from eurotrain.train import Trainer, TrainResult

CATEGORIES = ("startup", "resume", "productive", "checkpoint", "eval", "rollback", "lost", "other")
FILE = "goodput.jsonl"
LIVE = ".goodput-live.json"
ATTEMPT_START_ENV = "EUROTRAIN_ATTEMPT_START"
"""When the job script started this attempt's srun (Unix time); the job's start for attempt 0."""
HEARTBEAT_S = 5.0
MAX_SECONDS = 1e9
"""No duration in a record is longer (31 years): a larger number is damage, not a run."""
RECORD_KEYS = ("job", "requeue", "attempt", "start", "end", "wall_s",
               *(f"{c}_s" for c in CATEGORIES), "steps", "how", "gap_s", "gap")  # fmt: skip


class Ledger:
    """Seconds by category, charged by whoever spends them."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def span(self, category: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[category] += time.perf_counter() - start


def attempt_start() -> float:
    """When this attempt began: the job script's clock where there is one, else when this
    process started (from /proc), else now."""
    names = (JOB_START_ENV, ATTEMPT_START_ENV) if attempt() == 0 else (ATTEMPT_START_ENV,)
    for name in names:
        with contextlib.suppress(KeyError, ValueError):
            value = float(os.environ[name])
            if math.isfinite(value):  # "nan" would make every record fail check_record
                return value
    return process_start_time()


def process_start_time() -> float:
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22: starttime
        lines = Path("/proc/stat").read_text().splitlines()
        btime = next(int(line.split()[1]) for line in lines if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class GoodputRecorder(Callback):
    """Times the steps, takes the stalls the ledger was charged, and writes this attempt's record
    (rank 0). Construct it last in the trainer's set-up: that moment ends the start-up."""

    def __init__(self, run_dir: Path, ledger: Ledger, enabled: bool) -> None:
        self.run_dir, self.ledger, self.enabled = run_dir, ledger, enabled
        self.start = attempt_start()
        self.ready = time.time()
        self.ready_clock = time.perf_counter()
        self.first_step: int | None = None
        self.last_step = 0
        self.step_start = 0.0
        self.charged_at_start = 0.0
        """The ledger's total at the step's start: stalls charged inside a step (waiting for a
        checkpoint's staging) are not productive."""
        self.step_end = time.perf_counter()
        self.productive = 0.0
        self.cumulative: dict[int, float] = {}
        """Productive seconds up to and including each step (to find what a rollback undoes)."""
        self.commits: list[tuple[int, float]] = []
        self.last_beat = 0.0
        self.gap: dict[str, Any] = {"gap_s": 0.0, "gap": ""}
        self.done = False

    # ---- the life cycle ------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer) -> None:
        self.last_step = trainer.state.step
        if self.enabled:
            self._close_dead_attempt(trainer.state.step)
            self.gap = self._gap()

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        if step <= self.last_step:  # a rollback: the steps after the checkpoint count again
            self._undo_after(step - 1)
        self.charged_at_start = sum(self.ledger.seconds.values())
        self.step_start = time.perf_counter()

    def on_step_end(self, trainer: Trainer, step: int, metrics: StepMetrics) -> None:
        self.step_end = time.perf_counter()
        charged = sum(self.ledger.seconds.values()) - self.charged_at_start
        self.productive += max(0.0, self.step_end - self.step_start - charged)
        self.cumulative[step] = self.productive
        self.first_step = step if self.first_step is None else self.first_step
        self.last_step = step
        if self.enabled and time.perf_counter() - self.last_beat >= HEARTBEAT_S:
            self._heartbeat()

    def on_checkpoint_saved(self, trainer: Trainer, step: int, path: str) -> None:
        self.commits = [*self.commits[-7:], (step, self.cumulative.get(step, self.productive))]
        # Steps before the oldest checkpoint remembered are never undone: forget them.
        oldest = self.commits[0][0]
        self.cumulative = {s: t for s, t in self.cumulative.items() if s >= oldest}
        if self.enabled:
            self._heartbeat()

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        done = trainer.state.step >= trainer.cfg.train.steps
        self.finish("done" if done else "stopped")

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        self.abort("error")

    def abort(self, how: str) -> None:
        """The attempt failed (an error, or a hang the watchdog caught: called from its
        thread): the steps since the last commit, and the time since the last step ended
        (waiting on a dead peer, hung), are lost."""
        stuck = time.perf_counter() - self.step_end
        self.ledger.seconds["lost"] += stuck
        self.finish(how, lost=self.productive - self._committed_productive())

    # ---- records -------------------------------------------------------------------------
    def record(self, how: str, lost: float = 0.0, end: float | None = None) -> dict[str, Any]:
        end = time.time() if end is None else end
        seconds = dict(self.ledger.seconds)
        seconds["startup"] = max(0.0, self.ready - self.start)
        seconds["productive"] = max(0.0, self.productive - lost)
        seconds["lost"] = seconds.get("lost", 0.0) + lost
        wall = end - self.start
        seconds["other"] = wall - sum(seconds.get(c, 0.0) for c in CATEGORIES if c != "other")
        if seconds["other"] < 0:  # a stall also charged elsewhere (overlapping spans)
            seconds["lost"] = max(0.0, seconds["lost"] + seconds["other"])  # durations stay >= 0
            seconds["other"] = 0.0
        return {
            "job": os.environ.get("SLURM_JOB_ID", ""),
            "requeue": _requeue(),
            "attempt": attempt(),
            "start": round(self.start, 3),
            "end": round(end, 3),
            "wall_s": round(wall, 3),
            **{f"{c}_s": round(seconds.get(c, 0.0), 3) for c in CATEGORIES},
            "steps": [self.first_step or 0, self.last_step],
            "how": how,
        }

    def finish(self, how: str, lost: float = 0.0) -> None:
        """Append this attempt's record (once); also called by the hang watchdog's thread."""
        if self.done or not self.enabled:
            return
        self.done = True
        append_record(self.run_dir, {**self.record(how, lost), **self.gap})
        with contextlib.suppress(OSError):
            (self.run_dir / LIVE).unlink()

    def _heartbeat(self) -> None:
        self.last_beat = time.perf_counter()
        live = {**self.record("killed"), **self.gap, "commits": self.commits}
        _write_json(self.run_dir / LIVE, live)

    def _committed_productive(self) -> float:
        return self.commits[-1][1] if self.commits else 0.0

    def _undo_after(self, step: int) -> None:
        kept = self.cumulative.get(step, self._committed_productive())
        self.ledger.seconds["lost"] += self.productive - kept
        self.productive = kept
        self.cumulative = {s: t for s, t in self.cumulative.items() if s <= step}

    def _gap(self) -> dict[str, Any]:
        """Seconds since the previous record ended: a restart in this job, or the queue."""
        previous = read_records(self.run_dir)[-1:]
        if not previous:
            return {"gap_s": 0.0, "gap": ""}
        prev = previous[0]
        here = (os.environ.get("SLURM_JOB_ID", ""), _requeue())
        kind = "restart" if (prev.get("job"), prev.get("requeue")) == here else "queue"
        end = prev.get("end")
        gap = self.start - end if isinstance(end, (int, float)) else 0.0
        return {"gap_s": round(max(0.0, gap), 3), "gap": kind}

    def _close_dead_attempt(self, resumed_step: int) -> None:
        """The previous attempt died without its record: write it from its last heartbeat,
        with the work after the checkpoint this attempt resumed from counted as lost. A
        heartbeat that does not check is set aside with a warning; the run goes on."""
        path = self.run_dir / LIVE
        live, problem = read_live(self.run_dir)
        if problem is not None:
            _set_aside(path, problem)
            return
        if live is None:
            return
        kept = 0.0
        for step, productive in live.get("commits") or []:
            if step <= resumed_step:
                kept = float(productive)
        lost = max(0.0, live["productive_s"] - kept)
        record = {k: live[k] for k in RECORD_KEYS if k in live}
        record["productive_s"] = round(live["productive_s"] - lost, 3)
        record["lost_s"] = round(live.get("lost_s", 0.0) + lost, 3)
        append_record(self.run_dir, record)
        path.unlink(missing_ok=True)


def read_live(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The heartbeat in ``run_dir``, checked: (heartbeat, None); (None, what is wrong with it);
    or (None, None) where there is none."""
    path = run_dir / LIVE
    if not (path.exists() or path.is_symlink()):
        return None, None
    try:
        live = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        reason = (e.strerror if isinstance(e, OSError) else None) or unreadable(e)[:120]
        return None, f"unreadable ({reason})"
    problem = check_record(live, live=True)
    return (live, None) if problem is None else (None, problem)


def _set_aside(path: Path, problem: str) -> None:
    """Move a bad heartbeat out of the way (or remove it) and say so, once."""
    bad = path.with_name(path.name + ".bad")
    try:
        os.replace(path, bad)
        fate = f"moved to {bad.name}"
    except OSError:
        try:
            path.unlink()
            fate = "removed"
        except OSError:
            fate = "left in place (cannot be moved or removed)"
    print(
        f"warning: {path}: {problem}; {fate}; the previous attempt's goodput record is lost, "
        f"training goes on",
        file=sys.stderr,
        flush=True,
    )


def _seconds(value: Any) -> bool:
    """A duration: a number (not a bool) in [0, MAX_SECONDS] (NaN and infinities fail)."""
    return type(value) in (int, float) and 0 <= value <= MAX_SECONDS


def check_record(record: Any, live: bool = False) -> str | None:
    """What is wrong with a goodput record (or, ``live``, a heartbeat) read back; None if
    nothing. Required: ``wall_s`` (and a heartbeat's ``productive_s``); every other field may
    be absent but, where present, has the type and range that its readers rely on."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    required = ("wall_s", "productive_s") if live else ("wall_s",)
    for key in (*required, "gap_s", *(f"{c}_s" for c in CATEGORIES)):
        if key in record or key in required:
            value = record.get(key)
            if not _seconds(value):
                return f"{key} is {shown(value)}, not a duration in seconds"
    for key in ("start", "end"):
        value = record.get(key, 0.0)
        if type(value) not in (int, float) or not math.isfinite(value):
            return f"{key} is {shown(value)}, not a Unix time"
    for key in ("job", "how", "gap"):
        if not isinstance(record.get(key, ""), str):
            return f"{key} is {shown(record[key])}, not a string"
    for key in ("requeue", "attempt"):
        value = record.get(key, 0)
        if type(value) is not int or value < 0:
            return f"{key} is {shown(value)}, not a count"
    steps = record.get("steps", [0, 0])
    if not (isinstance(steps, list) and len(steps) == 2 and all(type(x) is int for x in steps)):
        return f"steps is {shown(steps)}, not [first, last]"
    if live:
        commits = record.get("commits") or []
        pairs = isinstance(commits, list) and all(
            isinstance(c, list) and len(c) == 2 and type(c[0]) is int and _seconds(c[1])
            for c in commits
        )
        if not pairs:
            return f"commits is {shown(commits)}, not a list of [step, productive seconds]"
    return None


def _requeue() -> int:
    value = os.environ.get("SLURM_RESTART_COUNT", "0")
    return int(value) if value.isascii() and value.isdigit() else 0  # int("²") fails


def append_record(run_dir: Path, record: dict[str, Any]) -> None:
    from eurotrain.metrics import open_private

    with contextlib.suppress(OSError), open_private(run_dir / FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from eurotrain.metrics import open_private

    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(OSError):
        with open_private(tmp, "w") as f:
            f.write(json.dumps(data))
        os.replace(tmp, path)


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of goodput.jsonl that parse and check (see ``scan_records``)."""
    return scan_records(run_dir)[0]


def scan_records(run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of goodput.jsonl that parse and pass ``check_record``, and how many lines
    did not (a line torn by a kill is one; so is damage)."""
    out, skipped = [], 0
    try:
        lines = (run_dir / FILE).read_text(errors="replace").splitlines()
    except OSError:
        return [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            rec = None
        if check_record(rec) is None:
            out.append(rec)
        else:
            skipped += 1
    return out, skipped


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the records: seconds per category, wall, gaps, and the ratio of productive
    time to the time the allocations ran (queue gaps between jobs are not allocated time).
    The records are ones that pass ``check_record`` (as ``read_records`` returns them)."""
    totals = {c: sum(float(r.get(f"{c}_s", 0.0)) for r in records) for c in CATEGORIES}
    restart = sum(float(r.get("gap_s", 0.0)) for r in records if r.get("gap") == "restart")
    queue = sum(float(r.get("gap_s", 0.0)) for r in records if r.get("gap") == "queue")
    wall = sum(float(r["wall_s"]) for r in records)
    allocated = wall + restart
    jobs = {(r.get("job"), r.get("requeue")) for r in records}
    return {
        "seconds": totals,
        "wall_s": wall,
        "restart_gap_s": restart,
        "queue_gap_s": queue,
        "allocated_s": allocated,
        "ratio": totals["productive"] / allocated if allocated > 0 else 0.0,
        "jobs": len(jobs),
        "attempts": len(records),
    }
