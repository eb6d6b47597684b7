"""Document-masked attention (data.document_positions) under every layout that splits the
model or the sequence: the same losses and gradient norms as one process with masks, and not
those of one process without them. The layouts that split heads or the sequence also run a
model with Qwen3's per-head q/k norms, Llama's attention and MLP biases and Mistral's sliding
window (a norm weight shared by heads split over tp ranks needs its gradient summed over them;
a window, like the document mask, applies to the whole sequence under Ulysses)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
from harness import TINY, FirstGradients, first_gradient_problems, overrides, train_layouts
from multiproc import run_distributed

from eurotrain.config import load_config
from eurotrain.models.attention import document_ids
from eurotrain.train import Trainer

RTOL = 1e-5
WORDS = [
    "the",
    "a",
    "of",
    "model",
    "token",
    "train",
    "rank",
    "shard",
    "mask",
    "data",
    "loss",
    "step",
    "seed",
    "grad",
    "norm",
]
TWO_RANKS = {
    "dp_shard=2": {"parallel.dp_shard": 2},
    "tp=2 sp": {"parallel.tp": 2, "parallel.dp_shard": 1},
    "tp=2 no sp": {"parallel.tp": 2, "parallel.dp_shard": 1, "parallel.sequence_parallel": False},
    "cp=2 ulysses": {"parallel.cp": 2, "parallel.dp_shard": 1},
    "pp=2 1f1b": {"parallel.pp": 2, "parallel.dp_shard": 1},
}
VARIANT = {
    "model.qk_norm": True,
    "model.attention_bias": True,
    "model.mlp_bias": True,
    "model.sliding_window": 12,  # sequences of 32 tokens
}
VARIANT_LAYOUTS = ("tp=2 sp", "tp=2 no sp", "cp=2 ulysses")  # the others keep the plain model


def _single(tmp_path, layout: dict, name: str) -> tuple[list[float], list[float], dict]:
    first = FirstGradients()
    cfg = load_config(TINY, overrides(layout, str(tmp_path), name))
    result = Trainer(cfg, callbacks=[first]).train()
    return result.losses, result.grad_norms, first.fingerprints or {}


def short_documents(root: Path) -> str:
    """200 files of 2-8 words: most rows of 32 tokens hold several documents."""
    rng = random.Random(0)
    root.mkdir()
    for i in range(200):
        words = rng.choices(WORDS, k=rng.randint(2, 8))
        (root / f"{i:03d}.txt").write_text(" ".join(words))
    return str(root)


def test_layouts_match_one_process_with_document_masks_and_model_variants(tmp_path):
    # Adam turns gradients that are pure rounding noise (a document's first token attends only
    # to itself: the flash-style softmax backward's dP - rowsum(dO * O) is then noise, not 0)
    # into full-size updates whose noise differs between layouts: eps 1e-6 keeps those
    # coordinates still (seen with eps 1e-8: grad norms apart by 1.5e-4 at step 5 under tp=2;
    # with 1e-6: <= 3e-6).
    corpus = {"data.corpus": short_documents(tmp_path / "docs"), "optim.eps": 1e-6}
    MASKED = {**corpus, "data.document_positions": True}
    plain = _single(tmp_path, corpus, "plain")
    masked = _single(tmp_path, MASKED, "masked")
    assert not all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(plain[0], masked[0]))
    variant = _single(tmp_path, {**MASKED, **VARIANT}, "variant")
    cases = [
        (f"variant {n}", {**MASKED, **VARIANT, **TWO_RANKS[n]}, variant)
        if n in VARIANT_LAYOUTS
        else (n, {**MASKED, **TWO_RANKS[n]}, masked)
        for n in TWO_RANKS
    ]
    per_rank = run_distributed(train_layouts, 2, [c[1] for c in cases], str(tmp_path))
    bad = []
    for i, (name, _, single) in enumerate(cases):
        for rank, results in enumerate(per_rank):
            got = results[i]
            for key, want in (("losses", single[0]), ("grad_norms", single[1])):
                assert len(got[key]) == len(want) == 5
                for step, (a, b) in enumerate(zip(got[key], want)):
                    if not math.isclose(a, b, rel_tol=RTOL):
                        bad.append(f"{name} rank {rank} {key}[{step}]: {a} != {b} (single)")
        # every parameter's own step-0 gradient: Qwen3's q/k norm weights are head_dim long
        bad += first_gradient_problems(name, [r[i] for r in per_rank], single[2], RTOL)
    assert not bad, "layouts drift from the single-process run:\n" + "\n".join(bad)


def test_validation_loss_is_masked_per_document(tmp_path):
    """Validation batches carry per-document positions too, and evaluation masks with them:
    Trainer.evaluate() is the mean of the model's masked per-token losses."""
    layout = {
        "data.corpus": short_documents(tmp_path / "docs"),
        "data.document_positions": True,
        "data.validation_fraction": 0.2,
        "train.steps": 1,
        "train.eval_batches": 2,
    }
    trainer = Trainer(load_config(TINY, overrides(layout, str(tmp_path), "eval")))
    got = trainer.evaluate()
    assert trainer.val_loader is not None
    trainer.val_loader.step = 0
    masked = plain = tokens = 0.0
    with torch.no_grad():
        for _ in range(2):
            batch = next(trainer.val_loader)
            assert batch.positions is not None
            for x, y, pos in zip(batch.inputs, batch.labels, batch.positions):
                masked += float(trainer.model(x, y, positions=pos, documents=document_ids(pos)))
                plain += float(trainer.model(x, y))
            tokens += batch.num_tokens
    assert math.isclose(got, masked / tokens, rel_tol=1e-6)
    assert not math.isclose(got, plain / tokens, rel_tol=1e-4)
