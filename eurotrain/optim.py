"""AdamW and the learning-rate schedules (warmup + cosine, warmup-stable-decay, constant)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from eurotrain.configtools import ConfigError, shown


@dataclass
class OptimConfig:
    """AdamW settings."""

    lr: float = 3e-4
    """Peak learning rate (reached at the end of warmup)."""
    betas: list[float] | None = None
    """Adam betas; null means [0.9, 0.95]."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices; norms and biases are never decayed."""
    fused: bool | None = None
    """Use the fused AdamW kernel (null: yes). Fused AdamW skips the update of a non-finite
    step on the device; the foreach implementation (false) needs a host sync every step."""

    def __post_init__(self) -> None:
        if self.betas is None:
            self.betas = [0.9, 0.95]
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas: {shown(self.betas)} must be two numbers in [0, 1)")
        # `not x > 0` rather than `x <= 0`: nan fails it too (loaded configs never hold nan).
        if not self.lr > 0:
            raise ConfigError(f"optim.lr: {self.lr} must be > 0")
        if not self.eps > 0:
            raise ConfigError(f"optim.eps: {self.eps} must be > 0 (the default is 1e-8)")
        if not self.weight_decay >= 0:
            raise ConfigError(f"optim.weight_decay: {self.weight_decay} must be >= 0 (0 = off)")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule over train.steps optimizer steps."""

    name: Literal["cosine", "wsd", "constant"] = "cosine"
    """cosine: linear warmup then cosine decay to min_lr_ratio; wsd: warmup, constant, then a
    decay over the last decay_fraction of steps; constant: warmup then flat."""
    warmup_steps: int = 10
    """Linear warmup from ~0 to optim.lr."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of optim.lr (cosine and wsd)."""
    decay_fraction: float = 0.2
    """wsd: fraction of train.steps spent decaying."""
    decay_shape: Literal["linear", "sqrt", "cosine"] = "linear"
    """wsd: shape of the final decay (1-sqrt is the "sqrt" shape of Hägele et al. 2024)."""

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps: {self.warmup_steps} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"schedule.min_lr_ratio: {self.min_lr_ratio} must be in [0, 1]")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"schedule.decay_fraction: {self.decay_fraction} must be in (0, 1]")


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.name == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.name == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(cfg.decay_fraction * total_steps))
    decay_start = max(cfg.warmup_steps, total_steps - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    if cfg.decay_shape == "linear":
        shape = 1 - progress
    elif cfg.decay_shape == "sqrt":
        shape = 1 - math.sqrt(progress)
    else:
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (1 - floor) * shape


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: weight decay on matrices only. Parameters are
    grouped by how they are laid out (plain, or DTensors of one mesh) as well: fused and
    foreach kernels cannot mix plain tensors and DTensors (tensor parallelism without sequence
    parallelism has both)."""
    groups: dict[tuple[bool, object], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and "norm" not in name
        groups.setdefault((decay, getattr(p, "device_mesh", None)), []).append(p)
    fused = cfg.fused if cfg.fused is not None else True
    param_groups = [
        {"params": params, "weight_decay": cfg.weight_decay if decay else 0.0}
        for (decay, _), params in groups.items()
    ]
    assert cfg.betas is not None
    return torch.optim.AdamW(
        param_groups,
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        fused=fused or None,
        foreach=None if fused else True,
    )


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose restored state also sets the optimizer's learning rates: LambdaLR's own
    load_state_dict leaves them to the next step() (so the first step after a resume would use
    whatever the optimizer was built or loaded with)."""

    def load_state_dict(self, state_dict: dict) -> None:
        groups = len(self.optimizer.param_groups)
        super().load_state_dict(state_dict)
        if len(self.base_lrs) != groups:
            # The parameter groups depend on the layout (one per mesh the DTensors live on:
            # expert or tensor parallelism adds some), the learning rates do not: every group
            # peaks at optim.lr. A checkpoint from another layout has another number of them.
            self.base_lrs = [self.base_lrs[0]] * groups
            self._last_lr = [self._last_lr[0]] * groups
        for group, lr in zip(self.optimizer.param_groups, self.get_last_lr()):
            group["lr"] = lr


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int
) -> Schedule:
    return Schedule(optimizer, lambda step: lr_factor(cfg, step, total_steps))
