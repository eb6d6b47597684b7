"""``eurotrain status RUN_DIR``: how far a run is, its jobs, its last checkpoint, and where the
time went (goodput.jsonl, eurotrain/goodput.py). Reads files only; safe on a run in progress.
Every file is read as if from a stranger: a bad line or record is skipped (and counted), never a
traceback."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import yaml

from eurotrain.checkpoint.directory import latest
from eurotrain.errors import ConfigError
from eurotrain.fault.anomalies import read_windows
from eurotrain.goodput import CATEGORIES, LIVE, read_live, scan_records, summarize
from eurotrain.safe_yaml import load_yaml


def _config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            f"{run_dir}: not a run directory (no config.yaml); give the directory a run writes, "
            f"e.g. runs/<model>-job<ID>"
        )
    try:
        data = load_yaml(path.read_text(), str(path))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({e})") from None
    return data if isinstance(data, dict) else {}


def _last_step(run_dir: Path) -> int:
    """The highest step in metrics.jsonl; lines that do not parse, or whose step is not a
    count, are skipped."""
    step = 0
    try:
        lines = (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines()
    except OSError:
        return 0
    for line in lines:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict) and type(record.get("step")) is int:
            step = max(step, record["step"])
    return step


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"


def report(run_dir: Path) -> dict[str, Any]:
    """Everything the status shows, as data."""
    cfg = _config(run_dir)
    train: dict[str, Any] = cfg["train"] if isinstance(cfg.get("train"), dict) else {}
    ckpt: dict[str, Any] = cfg["checkpoint"] if isinstance(cfg.get("checkpoint"), dict) else {}
    steps = train.get("steps") if isinstance(train.get("steps"), int) else 0
    root = Path(ckpt["dir"]) if isinstance(ckpt.get("dir"), str) and ckpt["dir"] else None
    newest, _ = latest(root or run_dir / "checkpoints")
    records, skipped = scan_records(run_dir)
    live, live_problem = read_live(run_dir)
    hangs = sorted(p.name for p in (run_dir / "hangs").glob("*") if p.is_dir())
    return {
        "run_dir": str(run_dir),
        "steps_done": _last_step(run_dir),
        "steps": steps,
        "last_checkpoint": None if newest is None else {
            "path": str(newest.path), "step": newest.step,
            "created": (newest.marker or {}).get("created"),
        },
        "goodput": {**summarize(records), "skipped": skipped},
        "running": live,
        "running_problem": live_problem,
        "skipped_windows": read_windows(run_dir),
        "hangs": hangs,
    }  # fmt: skip


def render(info: dict[str, Any]) -> str:
    done, steps = info["steps_done"], info["steps"]
    share = f" ({100 * done / steps:.0f}%)" if steps else ""
    lines = [f"run {info['run_dir']}: step {done} of {steps}{share}"]
    live = info["running"]
    if live:
        age = time.time() - float(live.get("end", time.time()))
        lines.append(
            f"running or died without a record: job {live.get('job') or '-'} (requeue "
            f"{live.get('requeue', 0)}, start {live.get('attempt', 0)}), last heartbeat "
            f"{_duration(age)} ago"
        )
    if info["running_problem"]:
        lines.append(
            f"heartbeat {LIVE}: {info['running_problem']}; not shown (the run's next start "
            f"sets it aside)"
        )
    ck = info["last_checkpoint"]
    lines.append(
        "last checkpoint: none" if ck is None else
        f"last checkpoint: {ck['path']} (step {ck['step']}, {ck.get('created') or 'time unknown'})"
    )  # fmt: skip
    g = info["goodput"]
    if g["skipped"]:
        lines.append(
            f"goodput.jsonl: {g['skipped']} line(s) skipped (torn by a kill, or malformed); the "
            f"figures below leave them out"
        )
    restarts = g["attempts"] - g["jobs"]
    lines.append(
        f"jobs so far: {g['jobs']} ({g['attempts']} starts of the ranks, {restarts} of them "
        f"restarts inside a job)"
    )
    if g["attempts"]:
        allocated = g["allocated_s"]
        lines.append(
            f"effective training time: {100 * g['ratio']:.1f}% (productive "
            f"{_duration(g['seconds']['productive'])} of {_duration(allocated)} allocated; "
            f"queue between jobs {_duration(g['queue_gap_s'])})"
        )
        rows = [(c, g["seconds"][c]) for c in CATEGORIES] + [("restart gaps", g["restart_gap_s"])]
        for name, seconds in rows:
            part = 100 * seconds / allocated if allocated > 0 else 0.0
            lines.append(f"  {name:<13}{_duration(seconds):>11}  {part:5.1f}%")
    for w in info["skipped_windows"]:
        lines.append(
            f"skipped data: batches {w['start']}..{w['end'] - 1}, rolled back from step "
            f"{w.get('step', '?')} to {w.get('rolled_back_to', '?')}: {w.get('reason', '')}"
        )
    if info["hangs"]:
        lines.append(f"hangs (stacks of every rank): {', '.join(info['hangs'])} in hangs/")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="eurotrain status",
        description="Steps done, jobs so far, last checkpoint and goodput of a run directory.",
    )
    ap.add_argument("run_dir", help="the run directory (train.output_dir/run name)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    info = report(Path(args.run_dir))
    print(json.dumps(info, indent=1) if args.json else render(info))
    return 0
