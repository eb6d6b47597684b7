"""``--calibrate DIR``: replace the planner's defaults with what ``eurotrain bench`` measured on
this cluster (the format: eurotrain/bench/results.py).

- Links: the best bus bandwidth of all-gather, reduce-scatter and all-reduce at the largest
  message size measured, within a node (``intra``) and across nodes (``inter``, divided by the
  group's ranks per node, since the planner scales it back up by the ranks per node of a group).
- Efficiency: the median over the ``train`` records of MFU x step time / compute time (the
  achieved fraction of the peak while computing, the exposed communication taken out).
- Peak: tflops_per_gpu / mfu of the first record that has both, where the profile has no peak.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from eurotrain.bench.results import FILE, merge_results, read_results
from eurotrain.configtools import ConfigError
from eurotrain.plan.hardware import Hardware

COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce")


def load_bench(directory: str) -> dict[str, Any]:
    """One result from DIR/bench.json or from every DIR/*/bench.json."""
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"--calibrate {directory}: not a directory of `eurotrain bench` results")
    files = [root / FILE] if (root / FILE).is_file() else sorted(root.glob(f"*/{FILE}"))
    if not files:
        raise ConfigError(
            f"--calibrate {directory}: no {FILE} in it or its subdirectories; run "
            f"`eurotrain bench comms|train` (or `eurotrain launch --bench`) on the cluster first"
        )
    return merge_results([read_results(f) for f in files])


def _number(record: dict[str, Any], key: str) -> float | None:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        return None
    return float(value)


def _busbw(comms: list[dict[str, Any]], scope: str) -> tuple[float, int] | None:
    """(bus bandwidth, ranks per node) at the largest message size of ``scope``."""
    rows = [r for r in comms if r.get("scope") == scope and r.get("op") in COLLECTIVES]
    rows = [r for r in rows if _number(r, "busbw_GBps") and _number(r, "bytes")]
    if not rows:
        return None
    largest = max(float(r["bytes"]) for r in rows)
    best = max((r for r in rows if float(r["bytes"]) == largest), key=lambda r: r["busbw_GBps"])
    nodes = int(_number(best, "nodes") or 1)
    per_node = max(1, int(_number(best, "ranks") or 1) // nodes)
    return float(best["busbw_GBps"]), per_node


def calibrate(hw: Hardware, directory: str) -> None:
    """Overwrite ``hw``'s figures with the measured ones (and say so in ``hw.sources``)."""
    data = load_bench(directory)
    cluster = data.get("cluster")
    if cluster and cluster != hw.cluster:
        raise ConfigError(
            f"--calibrate {directory}: these results were measured on {cluster!r}, not on "
            f"--cluster {hw.cluster}; give the results of this cluster"
        )
    where = f"measured ({directory})"
    intra = _busbw(data["comms"], "intra")
    if intra:
        hw.intra_GBps, hw.sources["intra_GBps"] = intra[0], where
    inter = _busbw(data["comms"], "inter")
    if inter:
        hw.inter_GBps, hw.sources["inter_GBps"] = inter[0] / inter[1], where
    runs = [r for r in data["train"] if isinstance(r, dict)]
    if hw.sources.get("peak_tflops") != "profile":
        for r in runs:
            tflops, mfu = _number(r, "tflops_per_gpu"), _number(r, "mfu")
            if tflops and mfu:
                hw.peak_tflops, hw.sources["peak_tflops"] = tflops / mfu, where
                break
    efficiencies = []
    for r in runs:
        mfu, step, compute = _number(r, "mfu"), _number(r, "step_time_s"), _number(r, "compute_s")
        if mfu:
            efficiencies.append(min(1.0, mfu * step / compute) if step and compute else mfu)
    if efficiencies:
        hw.efficiency, hw.sources["efficiency"] = statistics.median(efficiencies), where
    if not (intra or inter or efficiencies):
        raise ConfigError(
            f"--calibrate {directory}: the results hold no collective bandwidths and no MFU "
            f"(run `eurotrain bench comms` and `eurotrain bench train` with a peak)"
        )
