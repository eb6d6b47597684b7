"""``eurotrain plan CONFIG --cluster NAME --nodes N[,N2..] --tokens T|--steps S``: the layouts
that fit, ranked by speed, with days, node-hours and GPU-hours; the recommended one as config
overrides and the matching ``eurotrain launch`` line (docs/planner.md)."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from typing import Any

from eurotrain.configtools import ConfigError
from eurotrain.plan.memory import GIB
from eurotrain.plan.planner import Option, Request, evaluate, nothing_fits, ranked, recommend

TOP = 10


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="eurotrain plan", description=__doc__)
    ap.add_argument("config", help="training config (YAML)")
    ap.add_argument("--cluster", required=True, help="cluster profile (eurotrain launch --list)")
    ap.add_argument("--nodes", required=True, help="node count(s), comma-separated: 4 or 4,8,16")
    budget = ap.add_mutually_exclusive_group(required=True)
    budget.add_argument("--tokens", help="tokens to train on (e.g. 2e12)")
    budget.add_argument("--steps", type=int, help="optimizer steps")
    ap.add_argument("--seq-len", type=int, help="sequence length (default: the config's)")
    ap.add_argument(
        "--global-batch", type=int, help="sequences (not tokens) per step (default: the config's)"
    )
    ap.add_argument("--max-memory-fraction", type=float, default=0.9,
                    help="share of each GPU's memory a layout may use (default 0.9)")  # fmt: skip
    ap.add_argument("--calibrate", help="a directory of `eurotrain bench` results for this cluster")
    ap.add_argument("--top", type=int, default=TOP, help="table rows per node count")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return ap


def _nodes(text: str) -> list[int]:
    try:
        nodes = sorted({int(n) for n in text.split(",") if n.strip()})
    except ValueError:
        nodes = []
    if not nodes or nodes[0] < 1:
        raise ConfigError(f"--nodes {text!r}: give positive node counts, e.g. --nodes 4 or 4,8,16")
    return nodes


def _budget_steps(args: argparse.Namespace, tokens_per_step: int) -> int:
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError(f"--steps {args.steps}: give at least 1 step")
        return int(args.steps)
    try:
        tokens = float(args.tokens)
    except ValueError:
        raise ConfigError(f"--tokens {args.tokens!r}: give a number, e.g. 2e12") from None
    if not tokens > 0 or not math.isfinite(tokens):
        raise ConfigError(f"--tokens {args.tokens}: the token budget must be a positive number")
    return max(1, math.ceil(tokens / tokens_per_step))


def build_request(args: argparse.Namespace) -> Request:
    from eurotrain.clusters import load_profile
    from eurotrain.config import load_config
    from eurotrain.plan.hardware import from_profile

    nodes = _nodes(args.nodes)
    if not 0 < args.max_memory_fraction <= 1:
        raise ConfigError(
            f"--max-memory-fraction {args.max_memory_fraction}: give a share in (0, 1], e.g. 0.9"
        )
    overrides = []
    if args.seq_len is not None:
        overrides += ["--data.seq_len", str(args.seq_len)]
    if args.global_batch is not None:
        overrides += ["--train.global_batch_size", str(args.global_batch)]
    cfg = load_config(args.config, overrides)
    hw = from_profile(load_profile(args.cluster))
    if args.calibrate:
        from eurotrain.plan.calibrate import calibrate

        calibrate(hw, args.calibrate)
    if hw.memory_gib <= 0 or hw.peak_tflops <= 0:
        raise ConfigError(
            f"cluster {args.cluster} ({hw.device}) has no device memory or bf16 peak in its "
            f"profile and no default for its device: the planner is for GPU clusters; add "
            f"accelerator.memory_gib and peak_bf16_tflops to the profile"
        )
    steps = _budget_steps(args, cfg.train.global_batch_size * cfg.data.seq_len)
    return Request(cfg, hw, nodes, steps, args.max_memory_fraction, overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    req = build_request(args)
    everything: list[Option] = []
    best: list[Option] = []
    table: dict[int, list[Option]] = {}
    all_reasons: list[str] = []
    for n in req.nodes:
        options, reasons = evaluate(req, n)
        everything += options
        all_reasons += reasons
        table[n] = ranked(options)
        if table[n]:
            best.append(table[n][0])
    if not best:
        raise nothing_fits(req, everything, all_reasons)
    pick = recommend(best)
    if args.json:
        print(json.dumps(to_json(req, table, pick, args), indent=1))
    else:
        print(render(req, table, pick, args))
    return 0


def overrides_of(option: Option, req: Request) -> list[str]:
    """The recommended layout as `eurotrain train` overrides (with --seq-len / --global-batch
    and the step count)."""
    words = list(req.overrides)
    for key, value in option.candidate.overrides.items():
        words += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return [*words, "--train.steps", str(req.steps)]


def _walltime(req: Request) -> str:
    from eurotrain.clusters import load_profile

    _, queue = load_profile(req.hw.cluster).queue(None)
    return queue.max_time or "24:00:00"


def jobs(req: Request, option: Option) -> int:
    """Jobs of the default queue's walltime the run needs (each resumes from the last
    checkpoint; the time to restart is not counted)."""
    from eurotrain.clusters import parse_walltime

    return max(1, math.ceil(option.speed.days * 86400 / parse_walltime(_walltime(req))))


def launch_line(req: Request, option: Option, args: argparse.Namespace) -> str:
    """The job for the recommended layout. A run longer than one walltime is a chain
    (--until-done), which needs checkpoints: `auto` (Young/Daly) where the config saves none. A
    machine that bills a project gets an ACCOUNT placeholder to replace."""
    from eurotrain.clusters import load_profile

    options = ["--cluster", req.hw.cluster, "--nodes", str(option.nodes), "--time", _walltime(req)]
    if load_profile(req.hw.cluster).account_required:
        options += ["--account", "ACCOUNT"]
    overrides = overrides_of(option, req)
    if jobs(req, option) > 1:
        options.append("--until-done")
        if req.cfg.checkpoint.interval == 0:
            overrides += ["--checkpoint.interval", "auto"]
    return shlex.join(["eurotrain", "launch", *options, args.config, *overrides])


def _row(o: Option) -> dict[str, Any]:
    s = o.speed
    return {
        "nodes": o.nodes,
        "layout": o.layout(),
        "overrides": o.candidate.overrides,
        "memory_gib": o.memory.as_gib(),
        "fits": o.fits,
        "step_s": round(s.step_s, 4),
        "step_breakdown_s": {
            "compute": round(o.time.compute_s, 4),
            "tp": round(o.time.tp_s, 4),
            "cp": round(o.time.cp_s, 4),
            "ep": round(o.time.ep_s, 4),
            "dp_exposed": round(o.time.dp_s, 4),
            "bubble": round(o.time.bubble_s, 4),
        },
        "tokens_per_s_per_gpu": round(s.tokens_per_s_per_gpu, 1),
        "tflops_per_gpu": round(s.tflops_per_gpu, 1),
        "mfu": round(s.mfu, 4),
        "days": round(s.days, 3),
        "node_hours": round(s.node_hours, 1),
        "gpu_hours": round(s.gpu_hours, 1),
    }


def to_json(
    req: Request, table: dict[int, list[Option]], pick: Option, args: argparse.Namespace
) -> dict[str, Any]:
    hw = req.hw
    return {
        "model": req.cfg.model.name,
        "params": req.cfg.model.num_params(),
        "active_params": req.cfg.model.num_params(active=True),
        "seq_len": req.cfg.data.seq_len,
        "global_batch": req.cfg.train.global_batch_size,
        "steps": req.steps,
        "tokens": req.steps * req.cfg.train.global_batch_size * req.cfg.data.seq_len,
        "hardware": {
            "cluster": hw.cluster,
            "device": hw.device,
            "gpus_per_node": hw.gpus_per_node,
            "memory_gib": hw.memory_gib,
            "usable_gib": round(req.usable_bytes / GIB, 2),
            "peak_tflops": hw.peak_tflops,
            "intra_GBps": hw.intra_GBps,
            "inter_GBps": hw.inter_GBps,
            "efficiency": hw.efficiency,
            "sources": hw.sources,
        },
        "layouts": {str(n): [_row(o) for o in opts[: args.top]] for n, opts in table.items()},
        "recommended": {
            **_row(pick),
            "train_overrides": overrides_of(pick, req),
            "launch": launch_line(req, pick, args),
            "jobs": jobs(req, pick),
        },
    }


def render(
    req: Request, table: dict[int, list[Option]], pick: Option, args: argparse.Namespace
) -> str:
    hw, m = req.hw, req.cfg.model
    tokens = req.steps * req.cfg.train.global_batch_size * req.cfg.data.seq_len
    assumed = [k for k, v in hw.sources.items() if v == "default"]
    active = f" ({m.num_params(active=True) / 1e9:.2f}B active)" if m.moe.enabled else ""
    lines = [
        f"{m.name}: {m.num_params() / 1e9:.2f}B parameters{active}, seq {req.cfg.data.seq_len}, "
        f"global batch {req.cfg.train.global_batch_size}, {req.steps} steps "
        f"({tokens:.3g} tokens)",
        f"{hw.cluster}: {hw.gpus_per_node}x {hw.device}, {hw.memory_gib:g} GiB "
        f"({req.usable_bytes / GIB:.1f} usable), peak {hw.peak_tflops:g} TFLOP/s x efficiency "
        f"{hw.efficiency:.2f}, links {hw.intra_GBps:g} / {hw.inter_GBps:g} GB/s per GPU "
        f"(intra / inter)" + (f"; planner defaults: {', '.join(assumed)}" if assumed else ""),
        "",
    ]
    shown = [o for opts in table.values() for o in opts[: args.top]]
    width = max([44, *(len(o.layout()) for o in shown)])  # the columns stay aligned
    header = f"{'nodes':>5}  {'layout':<{width}} {'GiB/GPU':>7} {'tok/s/GPU':>9} {'MFU':>5} " \
        f"{'days':>7} {'node-h':>9} {'GPU-h':>9}"  # fmt: skip
    lines.append(header)
    for n, opts in table.items():
        if not opts:
            lines.append(f"{n:>5}  (no layout fits)")
        for o in opts[: args.top]:
            s = o.speed
            lines.append(
                f"{n:>5}  {o.layout():<{width}} {o.memory.total / GIB:>7.1f} "
                f"{s.tokens_per_s_per_gpu:>9.0f} {s.mfu:>5.1%} {s.days:>7.2f} "
                f"{s.node_hours:>9.0f} {s.gpu_hours:>9.0f}"
            )
    lines += [
        "",
        f"recommended (fewest GPU-hours): {pick.nodes} nodes, {pick.layout()}",
        "  overrides: " + shlex.join(overrides_of(pick, req)),
        "  " + launch_line(req, pick, args),
        f"  {pick.speed.days:.2f} days: {jobs(req, pick)} job(s) of the default queue's "
        f"{_walltime(req)}, each resuming from the last checkpoint",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
