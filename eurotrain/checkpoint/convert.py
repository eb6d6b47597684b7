"""``eurotrain convert``: HF transformers safetensors <-> eurotrain (DCP) checkpoints.

    eurotrain convert hf-to-eurotrain HF_DIR OUT_DIR
        config.json + *.safetensors of a Llama, Qwen2, Qwen3, Mistral, Mixtral or Qwen3-MoE
        causal LM -> OUT_DIR/step-000000
        (a committed, weights-only checkpoint) + OUT_DIR/config.yaml (the model section and
        checkpoint.init_from) to continue pretraining from. A model eurotrain would compute
        differently (another architecture, activation, a window on some layers only, RoPE type,
        or tensors it has no place for) is refused with one line naming what differs.
    eurotrain convert eurotrain-to-hf CKPT_DIR OUT_DIR [--dtype bfloat16] [--max-shard-gb 5]
                                      [--untie]
        any eurotrain checkpoint, saved under any layout (or a checkpoints directory: its newest
        committed one) -> config.json + model.safetensors (sharded with an index when large),
        as the HF model type that computes the same function (mistral for a sliding window,
        qwen3 for q/k norms, qwen2 for q/k/v biases, else llama; a mixture of experts as
        qwen3_moe with q/k norms, else mixtral).

Both run in one process on the CPU and hold the whole model in memory once. Nothing is
unpickled without restriction: safetensors in; a DCP checkpoint is verified fully and read
through safe_reader.py (restricted metadata and values); safetensors out. HF_DIR's files must be
regular files or links to them (hub caches are all links; see hf_file), its JSON is read with
limits, and neither direction writes through a link in OUT_DIR (docs/checkpointing.md).
torch's HuggingFaceStorageReader/Writer would do the file format, but not the renaming, the
tied-embedding handling or the config, which are most of the work here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from eurotrain.checkpoint import directory
from eurotrain.checkpoint.checkpointer import write_commit
from eurotrain.checkpoint.directory import CheckpointError
from eurotrain.checkpoint.safe_reader import load_state
from eurotrain.checkpoint.storage import (
    DIGEST,
    DIR_MODE,
    FILE_MODE,
    checksum,
    make_dir,
    write_durable,
)
from eurotrain.checkpoint.verify import verify_checkpoint
from eurotrain.configtools import from_dict, to_dict
from eurotrain.errors import ConfigError, EurotrainError
from eurotrain.models.config import ModelConfig
from eurotrain.models.hf import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict
from eurotrain.models.hf_config import hf_config_notes
from eurotrain.safe_yaml import load_yaml

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- HF -> eurotrain -----------------------------------------------------------------------
INDEX = "model.safetensors.index.json"
MAX_JSON_BYTES = 64 << 20
"""Largest config.json or index read (the index of a 671B model with 90,000 tensors is ~9 MB)."""
MAX_JSON_DEPTH = 32
"""Deepest nesting read in them (HF's configs nest a few levels: rope_scaling, text_config)."""


def hf_file(hf_dir: Path, name: str) -> Path:
    """HF_DIR/name, checked to be a regular file or a symbolic link to one, wherever it points:
    a hub cache's snapshot directory holds nothing but links into ../../blobs/, and a directory
    of links to a shared copy of the weights is as common (outside_links names such files). A
    FIFO, a device or a directory is refused before it is opened: reading one never ends."""
    path = hf_dir / name
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if not path.is_symlink():
            raise
        raise CheckpointError(
            f"{path}: a symbolic link to {os.readlink(path)}, which does not exist; HF_DIR "
            f"must hold the model's files or links to them"
        ) from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else ""
        raise CheckpointError(
            f"{path}: {kind or 'a device or socket'}, not a regular file (nor a link to one); "
            f"HF_DIR must hold the model's files or links to them"
        )
    return path


def outside_links(hf_dir: Path, paths: list[Path]) -> list[str]:
    """Notes naming the files that are links to files outside HF_DIR, except a hub cache
    snapshot's links into its ../../blobs/ (the layout of ~/.cache/huggingface/hub)."""
    root = hf_dir.resolve()
    homes = [root]
    if root.parent.name == "snapshots":
        homes.append((root.parent.parent / "blobs").resolve())
    notes = []
    for path in paths:
        target = path.resolve()
        if not any(target.is_relative_to(home) for home in homes):
            notes.append(
                f"{path.name} is a link to {target}, outside {hf_dir}; imported from there"
            )
    return notes


def hf_weight_files(hf_dir: Path) -> list[Path]:
    """HF_DIR's safetensors files (those its index names, or all), each checked by hf_file; an
    index naming a file outside HF_DIR is an error."""
    if os.path.lexists(hf_dir / INDEX):
        index = hf_file(hf_dir, INDEX)
        content = _read_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise CheckpointError(f"{index}: no weight_map object of tensor names to file names")
        names = sorted(set(weight_map.values()))
        outside = [f for f in names if Path(f).name != f or f in ("", ".", "..")]
        if outside:
            raise CheckpointError(f"{index}: names files outside {hf_dir}: {outside[:3]}")
    else:
        names = [p.name for p in sorted(hf_dir.glob("*.safetensors"))]
    if not names:
        raise FileNotFoundError(
            f"{hf_dir}: no *.safetensors files (pytorch_model.bin is not read: it is a pickle; "
            f"re-save the model with save_pretrained(safe_serialization=True))"
        )
    return [hf_file(hf_dir, name) for name in names]


def read_hf_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors ``files``; a name in two files is an error, never a
    silent choice."""
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if key in state:
                        raise CheckpointError(f"{path}: tensor {key} is in two files")
                    state[key] = f.get_tensor(key)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    return state


class _HugeInt:
    """An integer in a JSON file that no 64-bit field holds, kept (unconverted) to name its key:
    int() of more than 4,300 digits raises a ValueError that names no key."""

    def __init__(self, text: str) -> None:
        self.digits = len(text.lstrip("-"))


def _parse_int(text: str) -> int | _HugeInt:
    if len(text) > 20:
        return _HugeInt(text)
    value = int(text)
    return value if -(2**63) <= value < 2**63 else _HugeInt(text)


def _read_json(path: Path) -> Any:
    """A JSON file of HF_DIR (checked by hf_file) of at most MAX_JSON_BYTES, nested at most
    MAX_JSON_DEPTH deep, every integer within 64 bits; else a one-line ConfigError naming the
    file (and the key)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO swapped in: no wait
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{path}: not a regular file (it was replaced while read)")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_JSON_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_JSON_BYTES:
        raise ConfigError(f"{path}: more than {MAX_JSON_BYTES} bytes; not a HF config or index")
    try:
        value = json.loads(data, parse_int=_parse_int)
    except RecursionError:
        raise ConfigError(
            f"{path}: nested too deeply for Python's JSON reader; a HF config nests a few levels"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    todo: list[tuple[str, Any, int]] = [("", value, 0)]  # not recursive: depth is what is checked
    while todo:
        key, item, depth = todo.pop()
        if isinstance(item, _HugeInt):
            raise ConfigError(
                f"{path}: {key or 'the file'} is an integer of {item.digits} digits, more than "
                f"64 bits hold; no HF config field needs one"
            )
        if depth > MAX_JSON_DEPTH:
            raise ConfigError(
                f"{path}: {key} is nested more than {MAX_JSON_DEPTH} levels deep; a HF config "
                f"nests a few"
            )
        if isinstance(item, dict):
            todo.extend((f"{key}.{k}" if key else k, v, depth + 1) for k, v in item.items())
        elif isinstance(item, list):
            todo.extend((f"{key}[{i}]", v, depth + 1) for i, v in enumerate(item))
    return value


def hf_to_eurotrain(hf_dir: Path, out_dir: Path) -> Path:
    """Refuses (ConfigError / CheckpointError) any model eurotrain would compute differently,
    before anything is written; OUT_DIR must not hold a step-000000 or a config.yaml (an
    existing OUT_DIR keeps its mode)."""
    tmp, final = directory.step_dir(out_dir, 0, tmp=True), directory.step_dir(out_dir, 0)
    taken = [p for p in (final, tmp, out_dir / "config.yaml") if os.path.lexists(p)]
    if taken:  # a link there would be written through, a user's config.yaml overwritten
        raise FileExistsError(f"{taken[0]}: exists; choose an empty OUT_DIR")
    if not os.path.lexists(hf_dir / "config.json"):
        raise FileNotFoundError(f"{hf_dir / 'config.json'}: missing; HF_DIR must hold config.json")
    config_json = hf_file(hf_dir, "config.json")
    hf_cfg = _read_json(config_json)
    model_cfg = from_hf_config(hf_cfg)
    weight_files = hf_weight_files(hf_dir)
    for note in hf_config_notes(hf_cfg) + outside_links(hf_dir, [config_json, *weight_files]):
        print(f"eurotrain convert: note: {note}", file=sys.stderr)
    hf_state = read_hf_weights(weight_files)
    # Master weights are fp32 in eurotrain, whatever the HF files hold.
    weights = from_hf_state_dict(hf_state, model_cfg)
    weights = {k: v.to(torch.float32).contiguous() for k, v in weights.items()}

    if not out_dir.is_dir():
        make_dir(out_dir)
    tmp.mkdir(mode=DIR_MODE)  # not exist_ok: a directory (or link) made meanwhile is an error
    start = time.perf_counter()
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": weights}, storage_writer=FileSystemWriter(tmp), no_dist=True)
    run_cfg = {"model": to_dict(model_cfg), "checkpoint": {"init_from": str(final.resolve())}}
    text = yaml.safe_dump(run_cfg, sort_keys=False)
    write_durable(tmp / "config.yaml", text.encode())
    files = {}
    for path in sorted(tmp.iterdir()):
        path.chmod(FILE_MODE)
        files[path.name] = {"size": path.stat().st_size, DIGEST: checksum(path)}
    info = {"step": 0, "tokens_seen": 0, "kind": "weights", "layout": {}}
    marker = directory.make_marker(info, 1, files, time.perf_counter() - start)
    marker["source"] = str(hf_dir.resolve())
    write_commit(tmp, final, marker)
    _write_new(out_dir / "config.yaml", text.encode())
    return final


def _write_new(path: Path, data: bytes) -> None:
    """Write a file that does not exist yet, durably; O_EXCL fails on anything at ``path``,
    a symbolic link included, instead of writing through it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# ---- eurotrain -> HF -----------------------------------------------------------------------
def resolve_checkpoint(path: Path) -> Path:
    """A step-N directory, or the newest committed one under a checkpoints directory."""
    if (path / directory.MARKER).exists():
        return path
    if not path.exists():
        where = directory.describe_dir(path.parent) if path.parent.is_dir() else "nor its parent"
        raise CheckpointError(f"{path}: does not exist ({where})")
    found, _ = directory.latest(path)
    if found is None:
        raise CheckpointError(f"{path}: neither a committed checkpoint nor a directory of them")
    return found.path


def read_model_weights(ckpt: Path, metadata: Metadata | None = None) -> dict[str, torch.Tensor]:
    """The full (unsharded) model weights of a checkpoint saved under any layout; verified
    fully first unless its (verified) metadata is given."""
    if metadata is None:
        _, metadata = verify_checkpoint(ckpt, "full")
    state: dict[str, torch.Tensor] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata):
            state[key[len("model.") :]] = torch.zeros(meta.size, dtype=meta.properties.dtype)
    if not state:
        raise CheckpointError(f"{ckpt}: holds no model weights")
    load_state({"model": state}, ckpt, metadata, ("model.",))
    return state


def save_sharded(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> list:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2))
    return names


def check_export_dir(out_dir: Path) -> None:
    """OUT_DIR may exist (holding a tokenizer, say) but not hold a model's files: a link among
    them would be written through, and the files of two exports would mix (from_pretrained
    loads a stale model.safetensors before a new index)."""
    if not out_dir.is_dir():
        return
    clash = sorted(
        p.name
        for p in out_dir.iterdir()
        if p.name in ("config.json", INDEX) or p.name.endswith(".safetensors")
    )
    if clash:
        more = f" and {len(clash) - 3} more" if len(clash) > 3 else ""
        raise CheckpointError(
            f"{out_dir}: already holds {', '.join(clash[:3])}{more}; export into a new "
            f"directory, or one without config.json, *.safetensors or {INDEX}"
        )


def eurotrain_to_hf(
    ckpt_dir: Path,
    out_dir: Path,
    dtype: str = "float32",
    max_shard_gb: float = 5.0,
    untie: bool = False,
) -> list[str]:
    """``untie``: export a tied model with its own lm_head (for checkpoints whose two matrices
    came apart in training). The files are written into a private temporary directory
    inside OUT_DIR and renamed into place, config.json last: nothing is written through a
    link, and an export cut short leaves no partial model."""
    check_export_dir(out_dir)
    ckpt = resolve_checkpoint(ckpt_dir)
    _, metadata = verify_checkpoint(ckpt, "full")  # config.yaml included
    run_cfg = load_yaml((ckpt / "config.yaml").read_text(), str(ckpt / "config.yaml"))
    if not isinstance(run_cfg, dict) or not isinstance(run_cfg.get("model"), dict):
        raise CheckpointError(
            f"{ckpt / 'config.yaml'} holds no model section: the checkpoint's config is damaged; "
            f"export another checkpoint of the run"
        )
    model_cfg = from_dict(ModelConfig, run_cfg["model"], "model")
    if untie:
        model_cfg.tie_embeddings = False
    weights = read_model_weights(ckpt, metadata)
    hf_state = to_hf_state_dict(weights, model_cfg)
    hf_state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in hf_state.items()}
    hf_cfg = to_hf_config(model_cfg)
    hf_cfg["torch_dtype"] = dtype
    if not out_dir.is_dir():
        make_dir(out_dir)  # an existing OUT_DIR keeps its mode
    work = Path(tempfile.mkdtemp(prefix=".eurotrain-export-", dir=out_dir))  # mode 0700
    try:
        names = save_sharded(hf_state, work, int(max_shard_gb * 2**30))
        (work / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        for name in [*names, *([INDEX] if len(names) > 1 else []), "config.json"]:
            os.replace(work / name, out_dir / name)  # replaces a link, never writes through it
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return names


# ---- command line --------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eurotrain convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-eurotrain", help="HF safetensors dir -> eurotrain checkpoint")
    a.add_argument("hf_dir", type=Path)
    a.add_argument("out_dir", type=Path)
    b = sub.add_parser("eurotrain-to-hf", help="eurotrain checkpoint -> HF safetensors dir")
    b.add_argument("ckpt_dir", type=Path)
    b.add_argument("out_dir", type=Path)
    b.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    b.add_argument("--max-shard-gb", type=float, default=5.0)
    b.add_argument(
        "--untie",
        action="store_true",
        help="write lm_head separately (tie_word_embeddings false) for a tied model",
    )
    args = parser.parse_args(argv)
    try:
        if args.direction == "hf-to-eurotrain":
            final = hf_to_eurotrain(args.hf_dir, args.out_dir)
            print(
                f"wrote {final} and {args.out_dir / 'config.yaml'}; continue pretraining with "
                f"a config that includes its model section and checkpoint.init_from {final}"
            )
        else:
            files = eurotrain_to_hf(
                args.ckpt_dir, args.out_dir, args.dtype, args.max_shard_gb, args.untie
            )
            print(f"wrote {args.out_dir}: config.json, {', '.join(files)}")
    except EurotrainError as e:
        print(f"eurotrain convert: {e.label}: {e}", file=sys.stderr)
        return e.exit_code
    except (OSError, ValueError, KeyError) as e:
        print(f"eurotrain convert: {e}", file=sys.stderr)
        return 1
    return 0
