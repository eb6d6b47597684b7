"""Activation checkpointing and torch.compile, per transformer block, in place.

Both keep parameter names unchanged (no wrapper modules): checkpointing swaps a block's
``forward`` for a checkpointed call of the original, compile uses ``Module.compile()``.
"""

from __future__ import annotations

import os
import shlex
import sysconfig
import tempfile
from collections import Counter
from functools import partial
from typing import Any, cast

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

# Ops whose outputs selective checkpointing keeps: the matmuls and attention, the expensive
# part of recomputation. Everything else (norms, activations, RoPE) is recomputed.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


def apply_ac(model: nn.Module, mode: str, every: int = 1) -> Counter:
    """Checkpoint every ``every``-th block ("full" or "selective"); returns counts per mode."""
    counts: Counter = Counter()
    if mode == "none":
        return counts
    for key, layer in cast(nn.ModuleDict, model.layers).items():
        if int(key) % every:  # global block index: the same blocks whatever the pipeline split
            continue
        kwargs: dict[str, Any] = {"use_reentrant": False}
        if mode == "selective":
            kwargs["context_fn"] = _selective_context
        layer.forward = partial(checkpoint, layer.forward, **kwargs)
        counts[mode] += 1
    return counts


def apply_compile(model: nn.Module) -> nn.Module:
    for layer in cast(nn.ModuleDict, model.layers).values():
        layer.compile(fullgraph=False)
    return model


def inductor_cpu_problem() -> str | None:
    """Why torch.compile would fail on a CPU here, or None.

    On a CPU, Inductor compiles C++ with g++, and torch 2.13 puts torch's and Python's library
    directories (``-L``) and its cache directory into that command unquoted, then splits it as
    a shell would (pytorch/pytorch pull request 191010): whitespace, a quote or a backslash in
    any of them breaks the command, and every compile fails with a C++ compile error of a few
    hundred lines. GPUs compile Triton, not this."""
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not cache:
        try:
            from torch._inductor.runtime.cache_dir_utils import default_cache_dir

            cache = default_cache_dir()  # under TMPDIR
        except ImportError:  # another torch: its default was under TMPDIR too
            cache = tempfile.gettempdir()
    where = [
        ("torch's library directory", os.path.join(os.path.dirname(torch.__file__), "lib"),
         "install the environment (venv) under a plain path"),
        ("Python's library directory", sysconfig.get_config_var("LIBDIR") or "",
         "use a Python installed under a plain path"),
        ("Inductor's cache directory", os.path.abspath(cache),
         "set TORCHINDUCTOR_CACHE_DIR (or TMPDIR) to a plain path, e.g. /tmp/$USER-inductor"),
    ]  # fmt: skip
    bad = [f"{what} {path!r} ({fix})" for what, path, fix in where if path and _splits(path)]
    if not bad:
        return None
    return (
        f"torch.compile on a CPU cannot work here: torch {torch.__version__}'s C++ compile "
        f"command does not quote its paths, and these contain whitespace, a quote or a "
        f"backslash: {'; '.join(bad)}"
    )


def _splits(path: str) -> bool:
    """Whether a shell-style split of ``path`` is not ``path`` itself."""
    try:
        return shlex.split(path) != [path]
    except ValueError:  # an unbalanced quote
        return True
