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
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from eurotrain.errors import ConfigError

FORMAT = "eurotrain-bench/1"
FILE = "bench.json"


def new_results(cluster: str | None, device: str, per_node: int, backend: str) -> dict[str, Any]:
    import torch

    from eurotrain import __version__

    return {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
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
    """A bench.json (or a directory holding one), checked for the format."""
    file = path / FILE if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no {FILE} here; give a directory written by `eurotrain bench comms|train`"
        ) from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{file}: not a readable bench result ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{file}: not an {FORMAT} result (format {data.get('format')!r})")
    for key in ("comms", "train"):
        if not isinstance(data.get(key, []), list):
            raise ConfigError(f"{file}: {key!r} must be a list of records")
        data.setdefault(key, [])
    return data


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several (e.g. one job per node count): header of the first, records of all."""
    merged = dict(results[0])
    merged["comms"] = [r for res in results for r in res["comms"]]
    merged["train"] = sorted(
        (r for res in results for r in res["train"]), key=lambda r: (r.get("mode", ""), r["nodes"])
    )
    return merged
