"""The bench results file (``<dir>/bench.json``, format "eurotrain-bench/1"): one per run.

    {"format": "eurotrain-bench/1", "created": ISO time, "cluster": name or null,
     "device": ..., "device_count_per_node": ..., "backend": ..., "torch": ..., "eurotrain": ...,
     "command": ..., "comms": [comms records], "train": [train records]}

A comms record: op, scope (intra | inter), nodes, ranks, bytes (per rank, as nccl-tests count
them), dtype, time_s, algbw_GBps, busbw_GBps, nominal_GBps, busbw_fraction. A train record:
config, model, params, nodes, ranks, mode (weak | strong), layout, global_batch, micro_batch,
seq_len, steps, warmup_steps, tokens_per_s_per_gpu, tflops_per_gpu, mfu, peak_memory_gib,
step_time_s, compute_s, exposed_comm_s, scaling_efficiency. GBps is 1e9 bytes/s; times are
steady-state means in seconds. Readers ignore keys they do not know.

A comms record needs op, scope and bytes, a train record nodes; every other field may be absent
or null (shown as "-"), but where present has its type: counts are integers, measurements
finite numbers, layout an object of degrees. ``read_results`` refuses a file that breaks this
with one line naming the file, the record (``train[2]``) and the field.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from eurotrain.errors import ConfigError, shown, unreadable

FORMAT = "eurotrain-bench/1"
FILE = "bench.json"
_REQUIRED = {"comms": ("op", "scope", "bytes"), "train": ("nodes",)}
_POSITIVE = ("nodes", "ranks", "bytes")
_COUNTS = ("params", "global_batch", "micro_batch", "seq_len", "steps", "warmup_steps")
_NUMBERS = (
    "time_s", "algbw_GBps", "busbw_GBps", "nominal_GBps", "busbw_fraction",
    "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu", "peak_memory_gib", "step_time_s",
    "compute_s", "exposed_comm_s", "scaling_efficiency",
)  # fmt: skip
_STRINGS = ("op", "scope", "dtype", "config", "model", "mode")


def new_results(cluster: str | None, device: str, per_node: int, backend: str) -> dict[str, Any]:
    import torch

    from eurotrain import __version__

    return {
        "format": FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "cluster": cluster,
        "device": device,
        "device_count_per_node": per_node,
        "backend": backend,
        "host": platform.node(),
        "torch": torch.__version__,
        "eurotrain": __version__,
        "command": " ".join(["eurotrain", *sys.argv[1:]]) if sys.argv else "",
        "comms": [],
        "train": [],
    }


def write_results(directory: Path, results: dict[str, Any]) -> Path:
    """Write ``directory/bench.json`` atomically (a partial file never replaces a whole one)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_results(path: Path) -> dict[str, Any]:
    """A bench.json (or a directory holding one), checked for the format and every record."""
    file = path / FILE if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no {FILE} here; give a directory written by `eurotrain bench comms|train`"
        ) from None
    except (OSError, ValueError, RecursionError) as e:
        raise ConfigError(f"{file}: not a readable bench result ({unreadable(e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{file}: not an {FORMAT} result (a JSON {type(data).__name__}, not an object); "
            f"give a {FILE} written by `eurotrain bench comms|train`"
        )
    if data.get("format") != FORMAT:
        raise ConfigError(f"{file}: not an {FORMAT} result (format {shown(data.get('format'))})")
    if not isinstance(data.get("cluster"), str | None):
        raise ConfigError(f"{file}: 'cluster' must be a cluster name or null")
    for key in ("comms", "train"):
        if not isinstance(data.get(key, []), list):
            raise ConfigError(f"{file}: {key!r} must be a list of records")
        data.setdefault(key, [])
        for i, record in enumerate(data[key]):
            problem = check_record(key, record)
            if problem:
                raise ConfigError(
                    f"{file}: {key}[{i}]: {problem}; fix or remove that record, or measure "
                    f"again (`eurotrain bench {key}`)"
                )
    return data


def check_record(kind: str, record: Any) -> str | None:
    """What is wrong with a ``kind`` ("comms" or "train") record; None if nothing."""
    if not isinstance(record, dict):
        return f"not a record (a JSON {type(record).__name__}, not an object)"
    for key in _REQUIRED[kind]:
        if record.get(key) is None:
            return f"no {key!r}, which every {kind} record needs"
    for key, value in record.items():
        if value is None:
            continue
        if key in _POSITIVE and (type(value) is not int or value < 1):
            return f"{key!r} is {shown(value)}, not a positive integer"
        if key in _COUNTS and (type(value) is not int or value < 0):
            return f"{key!r} is {shown(value)}, not a count"
        if key in _NUMBERS and (type(value) not in (int, float) or not math.isfinite(value)):
            return f"{key!r} is {shown(value)}, not a finite number"
        if key in _STRINGS and not isinstance(value, str):
            return f"{key!r} is {shown(value)}, not a string"
    if record.get("scope") not in (None, "intra", "inter"):
        return f"'scope' is {shown(record['scope'])}, not 'intra' or 'inter'"
    layout = record.get("layout")
    layout = {} if layout is None else layout  # absent or null, like every optional field
    if not (isinstance(layout, dict) and all(type(v) is int and v >= 1 for v in layout.values())):
        return f"'layout' is {shown(layout)}, not an object of parallel degrees"
    return None


def cell(value: Any, fmt: str = ".2f") -> str:
    """A table cell: ``value`` in ``fmt``, or "-" for a measurement a record lacks."""
    return "-" if value is None else format(value, fmt)


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several (e.g. one job per node count): header of the first, records of all."""
    merged = dict(results[0])
    merged["comms"] = [r for res in results for r in res["comms"]]
    merged["train"] = sorted(  # records checked by read_results: mode a string, nodes a count
        (r for res in results for r in res["train"]),
        key=lambda r: (r.get("mode") or "", r["nodes"]),
    )
    return merged
