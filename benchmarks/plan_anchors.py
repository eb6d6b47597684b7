"""The planner's speed model against published runs (benchmarks/RESULTS.md, docs/planner.md).

    python benchmarks/plan_anchors.py [--json]

Each anchor is the published layout and machine put through eurotrain's planner unchanged: the
device's default efficiency (eurotrain/plan/hardware.py), the datasheet peak, the nominal links
of the machine it ran on. Two anchors are where the defaults come from (role "default": IBM's
eager fms-fsdp 7B runs, one per device); every other one checks them and is fitted to nothing.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eurotrain.config import ModelConfig, load_config
from eurotrain.parallel.checks import check_layout
from eurotrain.plan.hardware import Hardware, default_efficiency
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
    role: str = "check"
    """"default": the run the device's default efficiency is read from; "check": a test of it."""
    extra_flops: Callable[[ModelConfig], float] | None = None
    """FLOPs per token the published run recomputed beyond eurotrain's checkpointing modes."""
    calibrate_on: int | None = None
    """Index of the anchor whose published figure sets the efficiency for a second prediction
    (as `eurotrain plan --calibrate` would with a measurement at a smaller scale)."""


def _node(name: str, device: str, peak: float, intra: float, inter: float) -> Hardware:
    return Hardware(name, device, 8, 80, peak, intra, inter, default_efficiency(device))


def _h100x8() -> Hardware:
    # Grand Teton H100 nodes (torchtitan's runs): 8 GPUs, NVLink 4, 400 Gb/s per GPU (50 GB/s)
    return _node("grand-teton", "NVIDIA H100 SXM", 989.4, 450.0, 50.0)


def _a100x8() -> Hardware:
    # Selene DGX A100 nodes (Narayanan et al. 2021): NVLink 3, 8x 200 Gb/s HDR (25 GB/s per GPU)
    return _node("selene", "NVIDIA A100 80GB", 312.0, 300.0, 25.0)


# IBM's clusters for fms-fsdp: "128 A100 GPUs with 400 Gbps", "96 H100 GPUs with 800 Gbps",
# read as the bandwidth of each 8-GPU node (the smaller reading: 6.25 and 12.5 GB/s per GPU).
def _ibm_a100() -> Hardware:
    return _node("ibm-a100", "NVIDIA A100 80GB", 312.0, 300.0, 6.25)


def _ibm_h100() -> Hardware:
    return _node("ibm-h100", "NVIDIA H100 80GB", 989.4, 450.0, 12.5)


def torchtitan_op_sac(m: ModelConfig) -> float:
    """torchtitan's op-level selective checkpointing (its default in December 2024) keeps every
    matmul output of a block's forward except every second one, which the backward computes
    again: wk, wo and w3 in the order wq, wk, wv, wo, w1, w3, w2 (2 FLOPs per weight a token).
    eurotrain's "selective" keeps them all."""
    assert m.head_dim is not None and m.num_kv_heads is not None
    kv = m.num_kv_heads * m.head_dim
    return m.num_layers * 2 * (m.dim * kv + m.dim * m.num_heads * m.head_dim + m.dim * m.ffn_dim)


def _llama2(dim: int, layers: int, heads: int, kv_heads: int, ffn: int) -> list[str]:
    # fms-fsdp's Llama 2 shapes (fms_fsdp/utils/config_utils.py): vocab 32,000, untied, seq 4096
    return [
        "--model.name", "llama2", "--model.dim", str(dim), "--model.num_layers", str(layers),
        "--model.num_heads", str(heads), "--model.num_kv_heads", str(kv_heads),
        "--model.ffn_dim", str(ffn), "--model.vocab_size", "32000",
        "--model.max_seq_len", "4096", "--data.seq_len", "4096", "--model.tie_embeddings", "false",
    ]  # fmt: skip


FMS = "IBM fms-fsdp README, eager table of 2024-03 (same scripts on both devices)"
FMS_MODELS = {
    # size: (shape, layout, checkpointing (fms-fsdp's "selective" = every 2nd block), published
    # tokens/s per GPU on A100, on H100)
    "7B": (_llama2(4096, 32, 32, 32, 11008), "hsdp", ("none", 1), 3700.0, 7500.0),
    "13B": (_llama2(5120, 40, 40, 40, 13824), "fsdp", ("full", 2), 1800.0, 3800.0),
    "34B": (_llama2(8192, 48, 64, 8, 22016), "fsdp", ("full", 1), 700.0, 1550.0),
    "70B": (_llama2(8192, 80, 64, 8, 28672), "fsdp", ("full", 1), 370.0, 800.0),
}


def _fms(size: str, device: str) -> Anchor:
    shape, layout, (ac, every), a100, h100 = FMS_MODELS[size]
    world, hw, published = (128, _ibm_a100(), a100) if device == "A100" else (96, _ibm_h100(), h100)
    dp = ["--parallel.dp_replicate", str(world // 8), "--parallel.dp_shard", "8"]
    if layout == "fsdp":
        dp = ["--parallel.dp_replicate", "1", "--parallel.dp_shard", "-1"]
    return Anchor(
        f"Llama 2 {size}, {world} {device}, {layout.upper()}, AC {ac} every {every}"
        " (fms-fsdp, eager)",
        FMS,
        "configs/tiny.yaml",
        [*shape, "--train.global_batch_size", str(2 * world), "--train.micro_batch_size", "2",
         *dp, "--parallel.activation_checkpointing", ac, "--parallel.ac_every", str(every)],
        world, hw, "tokens_per_s_per_gpu", published,
        role="default" if size == "7B" else "check",
    )  # fmt: skip


GPT3_175B = [
    # GPT-3 175B as a Llama-shaped model with the same FLOPs: 96 layers, hidden 12288, 96 heads
    # without GQA, an MLP of 3 x 12288 x 32768 weights (= GPT's 2 x 12288 x 49152), GPT-2 vocab
    "--model.name", "gpt3-175b", "--model.dim", "12288", "--model.num_layers", "96",
    "--model.num_heads", "96", "--model.num_kv_heads", "96", "--model.ffn_dim", "32768",
    "--model.vocab_size", "51200", "--model.max_seq_len", "2048", "--data.seq_len", "2048",
    "--model.tie_embeddings", "false",
]  # fmt: skip

TORCHTITAN = "torchtitan benchmarks/llama3_h100_202412_torchtitan.md, Tables 1 and 3"
ANCHORS = [
    Anchor(
        "Llama 3.1 8B, 8 H100, FSDP, selective AC (torchtitan, eager)",
        TORCHTITAN,
        "configs/llama3-8b.yaml",
        ["--train.global_batch_size", "16", "--train.micro_batch_size", "2",
         "--parallel.activation_checkpointing", "selective"],
        8, _h100x8(), "tokens_per_s_per_gpu", 5762.0, extra_flops=torchtitan_op_sac,
    ),
    Anchor(
        "Llama 3.1 8B, 128 H100, FSDP, selective AC (torchtitan, eager)",
        TORCHTITAN,
        "configs/llama3-8b.yaml",
        ["--train.global_batch_size", "256", "--train.micro_batch_size", "2",
         "--parallel.activation_checkpointing", "selective"],
        128, _h100x8(), "tokens_per_s_per_gpu", 5605.0, extra_flops=torchtitan_op_sac,
        calibrate_on=0,
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
    *(_fms(size, device) for device in ("A100", "H100") for size in FMS_MODELS),
]  # fmt: skip


def predict(anchor: Anchor, efficiency: float | None = None) -> float:
    cfg = load_config(REPO / anchor.config, anchor.overrides)
    dims = check_layout(cfg, anchor.world, cuda=True)
    hw = replace(anchor.hardware, efficiency=efficiency or anchor.hardware.efficiency)
    extra = anchor.extra_flops(cfg.model) if anchor.extra_flops else 0.0
    st = step_time(cfg, dims, hw, extra)
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
            "role": a.role,
            "efficiency": a.hardware.efficiency,
            # the efficiency at which the planner would match the published figure
            "implied_efficiency": round(a.hardware.efficiency * a.published / value, 4),
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
                f"{r['published']:.1f} ({r['ratio'] - 1:+.1%}; efficiency {r['efficiency']:.2f},"
                f" implied {r['implied_efficiency']:.3f})"
            )
            if r["role"] == "default":
                line += " [where the default comes from]"
            if "predicted_calibrated" in r:
                line += (
                    f"; with the efficiency of the smaller run ({r['calibrated_efficiency']}):"
                    f" {r['predicted_calibrated']:.1f} ({r['ratio_calibrated'] - 1:+.1%})"
                )
            print(line)  # fmt: skip
        checks = [r["ratio"] - 1 for r in rows if r["role"] == "check"]
        inside = sum(abs(e) <= 0.15 for e in checks)
        print(f"checks within +-15 %: {inside} of {len(checks)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
