"""Qwen3's per-head q/k norms, Llama's attention and MLP biases and Mistral's sliding window
under the layouts that split heads, projections or the sequence: the same losses and gradient
norms as one process (a norm weight shared by heads split over tp ranks needs its gradient
summed over them; a window must be applied to the whole sequence under Ulysses)."""

from __future__ import annotations

import math

from harness import TINY, overrides, train_layouts
from multiproc import run_distributed

from eurotrain.config import load_config
from eurotrain.train import Trainer

RTOL = 1e-5
VARIANT = {
    "model.qk_norm": True,
    "model.attention_bias": True,
    "model.mlp_bias": True,
    "model.sliding_window": 12,  # sequences of 32 tokens
}
TWO_RANKS = {
    "tp=2 sp": {"parallel.tp": 2, "parallel.dp_shard": 1},
    "tp=2 no sp": {"parallel.tp": 2, "parallel.dp_shard": 1, "parallel.sequence_parallel": False},
    "cp=2 ulysses": {"parallel.cp": 2, "parallel.dp_shard": 1},
}


def test_layouts_match_one_process(tmp_path):
    single = Trainer(load_config(TINY, overrides(VARIANT, str(tmp_path), "single"))).train()
    names = list(TWO_RANKS)
    per_rank = run_distributed(
        train_layouts, 2, [{**VARIANT, **TWO_RANKS[n]} for n in names], str(tmp_path)
    )
    bad = []
    for i, name in enumerate(names):
        for rank, results in enumerate(per_rank):
            got = results[i]
            for key, want in (("losses", single.losses), ("grad_norms", single.grad_norms)):
                assert len(got[key]) == len(want) == 5
                for step, (a, b) in enumerate(zip(got[key], want)):
                    if not math.isclose(a, b, rel_tol=RTOL):
                        bad.append(f"{name} rank {rank} {key}[{step}]: {a} != {b} (single)")
    assert not bad, "layouts drift from the single-process run:\n" + "\n".join(bad)
