"""The planner's speed model against published runs (benchmarks/RESULTS.md, docs/planner.md).

    python benchmarks/plan_anchors.py [--json]

Each anchor is the published layout and machine put through eurotrain's planner unchanged
(the default efficiency, the datasheet peak, the nominal links of the machine it ran on); the
planner is not fitted to any of them one by one.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eurotrain.config import load_config
from eurotrain.parallel.checks import check_layout
from eurotrain.plan.hardware import Hardware
from eurotrain.plan.speed import step_time, throughput

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Anchor:
    name: str
    source: str
    config: str
    overrides: list[str]
    world: int
    hardware: Hardware
    metric: str
    """tokens_per_s_per_gpu, or hardware_tflops_per_gpu (FLOPs counting recomputation)."""
    published: float
    calibrate_on: int | None = None
    """Index of the anchor whose published figure sets the efficiency for a second prediction
    (as `eurotrain plan --calibrate` would with a measurement at a smaller scale)."""


def _h100x8() -> Hardware:
    # DGX H100 nodes (torchtitan's runs): 8 GPUs, NVLink 4, 8x 400 Gb/s NICs (50 GB/s per GPU)
    return Hardware("dgx-h100", "NVIDIA H100 SXM", 8, 80, 989.4, 450.0, 50.0)


def _a100x8() -> Hardware:
    # Selene DGX A100 nodes (Narayanan et al. 2021): NVLink 3, 8x 200 Gb/s HDR (25 GB/s per GPU)
    return Hardware("selene", "NVIDIA A100 80GB", 8, 80, 312.0, 300.0, 25.0)


GPT3_175B = [
    # GPT-3 175B as a Llama-shaped model with the same FLOPs: 96 layers, hidden 12288, 96 heads
    # without GQA, an MLP of 3 x 12288 x 32768 weights (= GPT's 2 x 12288 x 49152), GPT-2 vocab
    "--model.name", "gpt3-175b", "--model.dim", "12288", "--model.num_layers", "96",
    "--model.num_heads", "96", "--model.num_kv_heads", "96", "--model.ffn_dim", "32768",
    "--model.vocab_size", "51200", "--model.max_seq_len", "2048", "--data.seq_len", "2048",
    "--model.tie_embeddings", "false",
]  # fmt: skip

ANCHORS = [
    Anchor(
        "Llama 3.1 8B, 8 H100, FSDP, selective AC (torchtitan, eager)",
        "torchtitan benchmarks/llama3_h100_202412_torchtitan.md",
        "configs/llama3-8b.yaml",
        ["--train.global_batch_size", "8", "--parallel.activation_checkpointing", "selective"],
        8, _h100x8(), "tokens_per_s_per_gpu", 5762.0,
    ),
    Anchor(
        "Llama 3.1 8B, 128 H100, FSDP, selective AC (torchtitan, eager)",
        "torchtitan benchmarks/llama3_h100_202412_torchtitan.md",
        "configs/llama3-8b.yaml",
        ["--train.global_batch_size", "128", "--parallel.activation_checkpointing", "selective"],
        128, _h100x8(), "tokens_per_s_per_gpu", 5605.0, calibrate_on=0,
    ),
    Anchor(
        "GPT-3 175B, 1,536 A100, tp 8 x pp 16 x dp 12, full AC (Narayanan et al. 2021)",
        "Narayanan et al., SC21, 'Efficient Large-Scale Language Model Training on GPU Clusters'",
        "configs/tiny.yaml",
        [*GPT3_175B, "--train.global_batch_size", "1536", "--train.micro_batch_size", "1",
         "--parallel.tp", "8", "--parallel.pp", "16", "--parallel.dp_shard", "12",
         "--parallel.pp_schedule", "interleaved_1f1b", "--parallel.pp_virtual_stages", "2",
         "--parallel.activation_checkpointing", "full"],
        1536, _a100x8(), "hardware_tflops_per_gpu", 148.0,
    ),
]  # fmt: skip


def predict(anchor: Anchor, efficiency: float | None = None) -> float:
    cfg = load_config(REPO / anchor.config, anchor.overrides)
    dims = check_layout(cfg, anchor.world, cuda=True)
    hw = replace(anchor.hardware, efficiency=efficiency or anchor.hardware.efficiency)
    st = step_time(cfg, dims, hw)
    tp = throughput(st, dims, hw, steps=1)
    if anchor.metric == "tokens_per_s_per_gpu":
        return tp.tokens_per_s_per_gpu
    return tp.hardware_tflops_per_gpu


def main() -> int:
    rows = []
    for a in ANCHORS:
        value = predict(a)
        row = {
            "anchor": a.name,
            "metric": a.metric,
            "published": a.published,
            "predicted": round(value, 1),
            "ratio": round(value / a.published, 3),
        }
        if a.calibrate_on is not None:
            base = ANCHORS[a.calibrate_on]
            eff = base.hardware.efficiency * base.published / predict(base)
            value = predict(a, eff)
            row["calibrated_efficiency"] = round(eff, 4)
            row["predicted_calibrated"] = round(value, 1)
            row["ratio_calibrated"] = round(value / a.published, 3)
        rows.append(row)  # fmt: skip
    if "--json" in sys.argv:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            line = (
                f"{r['anchor']}: {r['metric']} predicted {r['predicted']:.1f}, published "
                f"{r['published']:.1f} ({r['ratio'] - 1:+.1%})"
            )
            if "predicted_calibrated" in r:
                line += (
                    f"; with the efficiency of the smaller run ({r['calibrated_efficiency']}):"
                    f" {r['predicted_calibrated']:.1f} ({r['ratio_calibrated'] - 1:+.1%})"
                )
            print(line)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
