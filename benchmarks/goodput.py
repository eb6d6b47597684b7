"""Goodput at scale, on paper: a 30-day run on 1,024 GPUs, simulated under failures and hangs,
for each way of handling them. Prints the effective-training-time ratio (ETTR: productive time
over the time the allocations ran, as `eurotrain status` reports it) and over calendar time.

    python benchmarks/goodput.py [--gpus 1024] [--days 30] [--seeds 200] [--from-run RUN_DIR]

Failures arrive at random (exponential gaps) at Llama 3's rate: 419 unexpected interruptions
in 54 days on 16,384 GPUs (Dubey et al. 2024, section 3.3.4), one per ~50,700 GPU-hours, so one
every ~49.5 h at 1,024 GPUs. A share of them (``--hang-share``) are hangs: nothing crashes, and
the job stands still until something notices. The times a failure costs are inputs:

    startup    srun, imports, rendezvous, model build: each start of the ranks
    resume     loading the checkpoint
    stall      the training thread's pause per checkpoint (async save: staging only)
    crash      from a crash to the start of the restart (srun's kill-on-bad-exit, tear-down)
    hang       from a hang to the restart: the watchdog's timeout (fault.hang_timeout_s)

``--from-run RUN_DIR`` takes these times from a run's goodput.jsonl (e.g. the chaos test's,
tests/launch/test_slurm_chaos.py: 2 CPU ranks, a tiny model); the defaults are assumptions for
128 nodes (see benchmarks/RESULTS.md).

Policies (each a column of the result):

    manual       no chain, no restart: a failure, a hang (found by the collective timeout) or
                 the walltime ends the job; a person resubmits it after --response-h hours, and
                 it waits --queue-h in the queue; checkpoints every --interval-min minutes
    chain        eurotrain launch --chain: walltime -> requeue; a failure -> requeue (queue wait
                 each time); hangs found by the collective timeout; fixed interval
    restart      + restarts inside the allocation (fault.max_restarts, spare nodes), the hang
                 watchdog; fixed interval
    restart+auto + checkpoint.interval auto (Young/Daly from the stall and the MTBF)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eurotrain.checkpoint.interval import young_daly
from eurotrain.fault.config import GPU_MTBF_HOURS

H = 3600.0


@dataclass
class Inputs:
    gpus: int = 1024
    days: float = 30.0
    walltime_h: float = 48.0
    startup_s: float = 180.0
    resume_s: float = 60.0
    stall_s: float = 2.0
    crash_detect_s: float = 60.0
    hang_timeout_s: float = 300.0
    collective_timeout_s: float = 600.0
    hang_share: float = 0.25
    queue_h: float = 1.0
    response_h: float = 6.0
    interval_min: float = 60.0

    @property
    def mtbf_s(self) -> float:
        return GPU_MTBF_HOURS / self.gpus * H


@dataclass
class Policy:
    name: str
    requeue: bool  # the job goes on by itself at the walltime and after failures
    restart: bool  # failures restart inside the allocation (no queue)
    watchdog: bool  # hangs found after hang_timeout_s, not the collective timeout
    auto: bool  # Young/Daly interval


POLICIES = (
    Policy("manual", requeue=False, restart=False, watchdog=False, auto=False),
    Policy("chain", requeue=True, restart=False, watchdog=False, auto=False),
    Policy("restart", requeue=True, restart=True, watchdog=True, auto=False),
    Policy("restart+auto", requeue=True, restart=True, watchdog=True, auto=True),
)


def interval_s(inp: Inputs, policy: Policy) -> float:
    if policy.auto:
        return max(young_daly(inp.stall_s, inp.mtbf_s), 60.0)
    return inp.interval_min * 60


def simulate(inp: Inputs, policy: Policy, rng: random.Random) -> dict[str, float]:
    """One 30-day calendar: seconds productive, allocated, and the counts."""
    end = inp.days * 24 * H
    every = interval_s(inp, policy)
    t = productive = allocated = 0.0
    failures = 0
    next_failure = rng.expovariate(1 / inp.mtbf_s)  # in allocated (running) time
    while t < end:
        # One job: from its start to the walltime, or to a failure that ends it.
        job_left = inp.walltime_h * H
        while job_left > 0 and t < end:
            cost = inp.startup_s + inp.resume_s
            t, job_left, allocated = t + cost, job_left - cost, allocated + cost
            # Train until the walltime, the end, or the next failure (allocated clock).
            run = min(job_left, end - t)
            until_failure = next_failure - allocated
            if until_failure >= run:  # no failure: all of it counts but the stalls
                saves = math.floor(run / (every + inp.stall_s))
                productive += run - saves * inp.stall_s
                t, job_left, allocated = t + run, job_left - run, allocated + run
                break
            # A failure after until_failure seconds: the work since the last save is lost.
            failures += 1
            worked = until_failure
            since_save = worked % (every + inp.stall_s)
            saves = math.floor(worked / (every + inp.stall_s))
            productive += worked - since_save - saves * inp.stall_s
            hang = rng.random() < inp.hang_share
            detect = inp.hang_timeout_s if hang and policy.watchdog else inp.collective_timeout_s
            detect = detect if hang else inp.crash_detect_s
            t, job_left = t + worked + detect, job_left - worked - detect
            allocated += worked + detect
            next_failure = allocated + rng.expovariate(1 / inp.mtbf_s)
            if not policy.restart:
                break  # the job ends; the next one waits in the queue (and for a person)
        # Between jobs: the queue, and a person where nothing requeues.
        failed = job_left > 0 and t < end
        t += inp.queue_h * H + (0.0 if policy.requeue else inp.response_h * H * failed)
        if not policy.requeue and not failed:
            t += inp.response_h * H / 2  # a walltime end is noticed sooner than a failure
    return {"productive": productive, "allocated": allocated, "calendar": end,
            "failures": failures}  # fmt: skip


def run(inp: Inputs, seeds: int) -> dict[str, dict[str, float]]:
    out = {}
    for policy in POLICIES:
        runs = [simulate(inp, policy, random.Random(seed)) for seed in range(seeds)]
        ettr = [r["productive"] / r["allocated"] for r in runs]
        cal = [r["productive"] / r["calendar"] for r in runs]
        out[policy.name] = {
            "ettr_mean": statistics.mean(ettr),
            "ettr_p5": sorted(ettr)[max(0, len(ettr) // 20 - 1)],
            "calendar_mean": statistics.mean(cal),
            "failures_mean": statistics.mean(r["failures"] for r in runs),
            "interval_min": interval_s(inp, policy) / 60,
        }
    return out


def from_run(inp: Inputs, run_dir: Path) -> dict[str, float]:
    """The times a run measured (its goodput.jsonl; medians where there are several): start-up,
    resume, the stall per save (checkpoint_s over the saves of checkpoint.interval), the time
    from a crash to the restart (the gap after a killed or failed start: its last heartbeat to
    the next start) and from a hang to the restart (the time stuck, plus the gap)."""
    import yaml

    records = [json.loads(line) for line in (run_dir / "goodput.jsonl").read_text().splitlines()
               if line.strip()]  # fmt: skip
    every = yaml.safe_load((run_dir / "config.yaml").read_text())["checkpoint"]["interval"]
    measured = {
        "startup_s": statistics.median(r["startup_s"] for r in records),
        "resume_s": statistics.median(r["resume_s"] for r in records if r["resume_s"] > 0),
    }
    if isinstance(every, int) and every > 0:
        stalls = [r["checkpoint_s"] / max(1, (r["steps"][1] - r["steps"][0] + 1) // every)
                  for r in records if r["checkpoint_s"] > 0]  # fmt: skip
        measured["stall_s"] = statistics.median(stalls)
    after = list(itertools.pairwise(records))
    crashes = [b["gap_s"] for a, b in after if a["how"] in ("killed", "error")]
    hangs = [a["lost_s"] + b["gap_s"] for a, b in after if a["how"] == "hang"]
    if crashes:
        measured["crash_detect_s"] = statistics.median(crashes)
    if hangs:
        measured["hang_timeout_s"] = statistics.median(hangs)
    for key, value in measured.items():
        setattr(inp, key, round(value, 3))
    return measured


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for key, value in vars(Inputs()).items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    ap.add_argument("--seeds", type=int, default=200, help="simulated runs per policy")
    ap.add_argument("--from-run", type=Path, help="take startup/resume/stall from a run dir")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    inp = Inputs(**{k: getattr(args, k) for k in vars(Inputs())})
    if args.from_run:
        from_run(inp, args.from_run)
    result = run(inp, args.seeds)
    if args.json:
        print(json.dumps({"inputs": vars(inp), "results": result}, indent=1))
        return 0
    print(f"inputs: {json.dumps(vars(inp))}; job MTBF {inp.mtbf_s / H:.1f} h")
    print("| policy | checkpoint every | failures | ETTR (allocated) mean / p5 | calendar |")
    print("|---|---|---|---|---|")
    for name, r in result.items():
        print(f"| {name} | {r['interval_min']:.0f} min | {r['failures_mean']:.1f} | "
              f"{100 * r['ettr_mean']:.2f}% / {100 * r['ettr_p5']:.2f}% | "
              f"{100 * r['calendar_mean']:.1f}% |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
