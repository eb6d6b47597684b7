"""Train the tiny model under several layouts inside one group of processes (reused: spawning
and importing torch is most of the cost on a 2-core CI machine) and collect what the parity
tests compare: losses, gradient norms, and the bytes of parameters, gradients and optimizer
state each rank holds."""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import zlib
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")

TEXT = (
    "the data loader serves packed sequences der Zug fährt über die Brücke la niña mange une "
    "crème brûlée à Zürich łódź żółw Ελληνικά γλώσσα суперкомпьютер eurohpc marenostrum lumi "
    "leonardo jupiter tokens shards résumé naïve café rank step grad norm mask model train"
)
WORDS = TEXT.split()


def parity_corpus() -> str:
    """300 generated documents (20-400 words), the same on every machine and Python release:
    the demo corpus is the running Python's own stdlib, which changes from release to release
    (random.Random's choice and randint are stable across releases). Written once per user
    into the temporary directory, each file atomically (every rank process imports this)."""
    rng = random.Random(2026)
    docs = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 400))) + "\n" for _ in range(300)
    ]
    digest = hashlib.sha256("\0".join(docs).encode()).hexdigest()[:12]
    root = Path(tempfile.gettempdir()) / f"eurotrain-parity-{os.getuid()}-{digest}"
    if not (root / "done").exists():
        root.mkdir(parents=True, exist_ok=True)
        for name, text in [*((f"{i:03d}.txt", d) for i, d in enumerate(docs)), ("done", "")]:
            tmp = root / f".{name}.{os.getpid()}"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, root / name)
    return str(root)


CORPUS = parity_corpus()

# Small enough for 8 processes on 2 cores; 4 micro-batches of accumulation on one rank.
# Adam's eps is 1e-6, not 1e-8: on the stdlib corpus of Debian's 3.11.2 (before CORPUS) a batch
# at step 4 whose residual stream nearly cancels amplified a 4e-7 weight difference 155-fold in
# the gradient norm. The difference came from Adam with eps 1e-8 turning rounding-level
# gradients (sums that nearly cancel) into full-size updates after step 0; with 1e-6 those stay
# rounding-level. Step 0 (identical weights) agreed within 4e-7 per parameter either way.
COMMON = [
    "--data.corpus", CORPUS,
    "--optim.eps", "1e-6",
    "--data.seq_len", "32",
    "--train.global_batch_size", "8",
    "--train.micro_batch_size", "2",
    "--train.steps", "5",
    "--train.device", "cpu",
    "--schedule.warmup_steps", "2",
    "--logging.progress", "lines",
    "--logging.log_interval", "100",
]  # fmt: skip


def overrides(layout: dict[str, Any], output_dir: str, name: str) -> list[str]:
    args = [*COMMON, "--train.output_dir", output_dir, "--train.run_name", name]
    for key, value in layout.items():
        args += [f"--{key}", str(value)]
    return args


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def measure_bytes(trainer) -> dict[str, int]:
    """Bytes this rank holds: parameters, gradients (after one more backward), Adam state."""
    params = [p for part in trainer.model_parts for p in part.parameters()]
    batch = next(trainer.loader)
    trainer.engine.forward_backward(batch, trainer.global_tokens(batch))
    state = [
        v
        for s in trainer.optimizer.state.values()
        for k, v in s.items()
        if k != "step" and isinstance(v, torch.Tensor)
    ]
    return {
        "params": sum(_local_bytes(p) for p in params),
        "grads": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "optim": sum(_local_bytes(v) for v in state),
    }


def describe_loss(part: Any) -> str:
    """Which loss a model part computes: the fused chunked CE (Triton or torch chunks), the
    vocabulary-parallel one, or the reference; "" for a stage without the output."""
    if part.output is None:
        return ""
    fn = part.loss_fn
    if type(fn).__name__ == "VocabParallelCrossEntropy":
        return "vocab-parallel-" + ("triton" if fn.use_triton else "torch")
    return "fused-" + fn.ops.impls["linear_cross_entropy"]


def data_parallel(model: Any) -> str:
    """How gradients are reduced across data-parallel ranks: "ddp" (replicate), "fsdp"
    (fully_shard) or "" (neither)."""
    from torch.distributed._composable.contract import _get_registry
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        return "fsdp"
    return "ddp" if "replicate" in (_get_registry(model) or {}) else ""


WRAPPERS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
"""Name segments that compile, activation checkpointing and wrappers add to parameter names."""


def gradient_fingerprints(model_parts: list[Any]) -> dict[str, tuple[float, float]]:
    """Per parameter (by its name in the plain model): the norm of its whole gradient and the
    gradient's projection onto a fixed random direction seeded by the name (which a wrong
    scale, a missing reduction or misplaced shards all change), in float64. Every rank holding
    a shard takes part in gathering it (DTensor.full_tensor), in the same order."""
    out: dict[str, tuple[float, float]] = {}
    for part in model_parts:
        for name, param in part.named_parameters():
            if param.grad is None:
                continue
            for segment in WRAPPERS:
                name = name.replace(segment, "")
            grad = param.grad
            if hasattr(grad, "full_tensor"):
                grad = grad.full_tensor()
            flat = grad.detach().to(torch.float64).flatten()
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            direction = torch.randn(flat.numel(), generator=gen, dtype=torch.float64)
            out[name] = (float(flat.norm()), float(flat @ direction))
    return out


class FirstGradients:
    """Records ``gradient_fingerprints`` of the first step's gradients (final, before
    clipping and the update): a layout's step 0 starts from the same weights and the same batch
    as one process, so every parameter's gradient must agree on its own, not only their norm."""

    def __init__(self) -> None:
        self.fingerprints: dict[str, tuple[float, float]] | None = None

    def on_before_optimizer_step(self, trainer: Any, step: int) -> None:
        if self.fingerprints is None:
            self.fingerprints = gradient_fingerprints(trainer.model_parts)


def first_gradient_problems(
    name: str, ranks: list[dict[str, Any]], want: dict[str, Any], rtol: float
) -> list[str]:
    """Every parameter's step-0 gradient (its norm and a random projection, float64) against
    one process's, within ``rtol`` of the parameter's own gradient norm: a gradient that is wrong
    for one small tensor (a norm weight split over tp ranks) barely moves the total norm. Each
    rank reports the parameters it holds (a pipeline stage's); a parameter on several ranks
    must agree on each."""
    if "first_grads" not in ranks[0]:  # DeepSpeed keeps its gradients in its own buffers
        return []
    problems = []
    seen: set[str] = set()
    for rank, got in enumerate(ranks):
        for param, (norm, proj) in got["first_grads"].items():
            seen.add(param)
            if param not in want:
                problems.append(f"{name} rank {rank}: gradient of {param}, unknown to one process")
                continue
            ref_norm, ref_proj = want[param]
            scale = max(ref_norm, 1e-12)
            if abs(norm - ref_norm) > rtol * scale or abs(proj - ref_proj) > rtol * scale:
                problems.append(
                    f"{name} rank {rank} step-0 gradient of {param}: norm {norm:.9g} vs "
                    f"{ref_norm:.9g}, projection {proj:.9g} vs {ref_proj:.9g} (single)"
                )
    missing = sorted(set(want) - seen)
    if missing:
        problems.append(f"{name}: no rank holds a gradient of {missing[:3]}")
    return problems


def train_layouts(
    rank: int, world_size: int, layouts: list[dict[str, Any]], output_dir: str
) -> list[dict[str, Any]]:
    """Run each layout in turn on this group; rank-local results, one dict per layout."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from eurotrain.config import load_config
    from eurotrain.train import Trainer

    results = []
    for i, layout in enumerate(layouts):
        cfg = load_config(TINY, overrides(layout, output_dir, f"layout{i}"))
        deepspeed = layout.get("parallel.engine") == "deepspeed"
        # DeepSpeed keeps its gradients in its own buffers; under MoE an expert no token of a
        # rank reached has no gradient there, so ranks would gather different parameters
        dense = not deepspeed and not cfg.model.moe.enabled
        first = FirstGradients()
        trainer = Trainer(cfg, callbacks=[first] if dense else [])
        syncs: list[bool] = []  # what the engine told FSDP2 / DDP before each micro-batch
        sync_fn = getattr(trainer.model, "set_requires_gradient_sync", None)
        if sync_fn is not None:

            def record(
                flag: bool, *args: Any, _fn: Any = sync_fn, _to: list = syncs, **kwargs: Any
            ) -> None:
                _to.append(flag)
                _fn(flag, *args, **kwargs)

            trainer.model.set_requires_gradient_sync = record  # type: ignore[method-assign]
        out = trainer.train()
        entry: dict[str, Any] = {"losses": out.losses, "grad_norms": out.grad_norms}
        entry["grad_syncs"] = list(syncs)  # the training steps only
        entry["loss_fns"] = [describe_loss(part) for part in trainer.model_parts]
        entry["data_parallel"] = data_parallel(trainer.model)
        if dense:
            entry["first_grads"] = first.fingerprints
        if not deepspeed:
            entry["bytes"] = measure_bytes(trainer)
        results.append(entry)
    return results
