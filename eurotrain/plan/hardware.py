"""The machine as the planner sees it: device memory, peak, link bandwidths and the achieved
efficiency, from the cluster profile with defaults where the profile has no sourced figure.

Every figure records where it came from (``sources``), so the report can say which numbers are
the profile's, which are the planner's defaults and which were measured (``--calibrate``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from eurotrain.clusters import ClusterProfile

# Defaults by device family, used only where the profile has no figure (docs/planner.md).
# peak: dense bf16 TFLOP/s (datasheets); intra: GPU-to-GPU GB/s per GPU, one direction
# (NVLink 4: 900 GB/s bidirectional per H100; NVLink 3: 600 per A100; MI250X: one 50 GB/s
# xGMI link to most peers); efficiency: the fraction of peak an eager PyTorch FSDP step achieves
# on its FLOPs while computing, as this planner reads it from IBM's fms-fsdp Llama 2 7B runs
# (the same eager scripts on both devices, HSDP, micro-batch 2, sequence 4096): 3,700 tokens/s
# per GPU on 128 A100 -> 0.55, 7,500 on 96 H100 -> 0.35 (benchmarks/plan_anchors.py, which
# checks these against other published runs). GH200 has the H100's GPU. MI250X has no such
# reference here and takes EFFICIENCY. A measurement replaces them all (--calibrate).
DEVICE_DEFAULTS: dict[str, dict[str, float]] = {
    "H100": {"peak": 989.4, "intra": 450.0, "efficiency": 0.35},
    "GH200": {"peak": 989.4, "intra": 450.0, "efficiency": 0.35},
    "A100": {"peak": 312.0, "intra": 300.0, "efficiency": 0.55},
    "MI250X": {"peak": 191.5, "intra": 50.0},
}
EFFICIENCY = 0.40
"""For a device without a family default."""
INTER_NODE_GBPS = 12.5
"""Per GPU across nodes when the profile has no figure: a 200 Gb/s NIC shared by two GPUs."""


@dataclass
class Hardware:
    cluster: str
    device: str
    gpus_per_node: int
    memory_gib: float
    peak_tflops: float
    """Dense bf16 peak per device."""
    intra_GBps: float
    """GPU-to-GPU bandwidth within a node, per GPU, one direction."""
    inter_GBps: float
    """Across nodes, per GPU (the node's NICs divided by its GPUs)."""
    efficiency: float = EFFICIENCY
    """Achieved fraction of the peak on the model's FLOPs, communication excluded."""
    sources: dict[str, str] = field(default_factory=dict)
    """For each figure: "profile", "default" (the planner's assumption) or "measured ..."."""

    def bus_GBps(self, ranks_per_node: int, spans_nodes: bool) -> float:
        """Bus bandwidth of one collective's group: within a node, the GPU links; across nodes,
        the node's NICs shared by the groups that run at once on it (``ranks_per_node`` of this
        group on each node get that share of the node's bandwidth)."""
        if not spans_nodes:
            return self.intra_GBps
        return min(self.intra_GBps, self.inter_GBps * ranks_per_node)


def _family(model: str) -> dict[str, float]:
    for key in sorted(DEVICE_DEFAULTS, key=len, reverse=True):
        if key.lower() in model.lower():
            return DEVICE_DEFAULTS[key]
    return {}


def default_efficiency(device: str) -> float:
    """The planner's efficiency for a device model name (its family's, else EFFICIENCY)."""
    return _family(device).get("efficiency", EFFICIENCY)


def from_profile(profile: ClusterProfile) -> Hardware:
    """The profile's figures, the family defaults where it has none."""
    acc, links = profile.accelerator, profile.links
    family = _family(acc.model)
    sources: dict[str, str] = {}

    def pick(name: str, value: float | None, default: float | None) -> float:
        if value:
            sources[name] = "profile"
            return float(value)
        sources[name] = "default"
        return float(default or 0.0)

    peak = pick("peak_tflops", acc.peak_bf16_tflops, family.get("peak"))
    intra = pick("intra_GBps", links.intra_node_GBps, family.get("intra", 100.0))
    inter = pick("inter_GBps", links.inter_node_GBps, INTER_NODE_GBPS)
    sources["efficiency"] = "default"
    return Hardware(
        cluster=profile.name,
        device=acc.model,
        gpus_per_node=profile.gpus_per_node,
        memory_gib=acc.memory_gib,
        peak_tflops=peak,
        intra_GBps=intra,
        inter_GBps=inter,
        efficiency=default_efficiency(acc.model),
        sources=sources,
    )
