"""MoEBalance: the experts' load after every step, the aux-loss-free bias update, and the router
statistics in metrics.jsonl.

Each MoE layer counts the tokens routed to each expert in its forward (this rank's micro-batches).
After the optimizer step the counts of all ranks that saw different tokens are summed in one
collective on the device (no host read), each layer's selection bias moves towards balance
(DeepSeek-V3: bias_i += rate * sign(mean load - load_i), identical on every rank since the counts
are global), and the counts restart. At log steps the loads reach the host and the log.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from eurotrain.callbacks import Callback, StepMetrics
from eurotrain.models.moe import MoE, moe_layers

if TYPE_CHECKING:
    from eurotrain.train import Trainer


class MoEBalance(Callback):
    def __init__(self, bias_update_rate: float) -> None:
        self.rate = bias_update_rate
        self.layers: dict[str, MoE] = {}
        self.group: dist.ProcessGroup | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        for part in trainer.model_parts:
            for name, layer in moe_layers(part).items():
                # "layers.3.moe" (or the same below a wrapper's prefix): the block index.
                self.layers[name.split("layers.", 1)[-1].split(".", 1)[0]] = layer
        mesh = trainer.mesh
        if mesh is not None and mesh["dp_cp"].size() > 1:
            # Tensor-parallel ranks route the same tokens; pipeline stages hold other layers.
            self.group = mesh["dp_cp"].get_group()

    def on_step_end(self, trainer: Trainer, step: int, metrics: StepMetrics) -> None:
        if not self.layers:
            return
        layers = list(self.layers.values())
        # One collective for all layers: [layers, experts + 2] (loads, then the aux-loss sums).
        both = torch.stack([torch.cat([m.tokens_per_expert, m.aux_loss_sum]) for m in layers])
        if self.group is not None:
            dist.all_reduce(both, group=self.group)
        counts, aux = both[:, :-2], both[:, -2:]
        if self.rate:
            mean = counts.mean(-1, keepdim=True)
            step_bias = self.rate * torch.sign(mean - counts)
            for layer, delta in zip(layers, step_bias):
                layer.expert_bias += delta
        if trainer.is_log_step(step):
            metrics.update(**self.statistics(counts, aux))
        for layer in layers:
            layer.tokens_per_expert.zero_()
            layer.aux_loss_sum.zero_()

    def statistics(self, counts: torch.Tensor, aux: torch.Tensor) -> dict[str, object]:
        """Numbers for every logger, per-expert shares for metrics.jsonl (one host read)."""
        share = counts / counts.sum(-1, keepdim=True).clamp(min=1)
        ratio = share * share.shape[-1]  # 1.0 = the expert got exactly its share
        loads = share.tolist()
        top, low = ratio.max(-1).values, ratio.min(-1).values
        out: dict[str, object] = {
            "moe_load_max": float(top.max()),
            "moe_load_min": float(low.min()),
            "moe_expert_load": {
                k: [round(v, 4) for v in row] for k, row in zip(self.layers, loads)
            },
        }
        if aux[:, 1].sum() > 0:  # token-weighted mean over the step, averaged over the blocks
            out["moe_aux_loss"] = float((aux[:, 0] / aux[:, 1].clamp(min=1)).mean())
        if self.rate:
            biases = torch.stack([layer.expert_bias for layer in self.layers.values()])
            out["moe_bias_range"] = float((biases.max(-1).values - biases.min(-1).values).max())
        return out
