"""DeepSpeed ZeRO (stages 1-3) as the alternative data-parallel engine behind the same Trainer.

We keep our optimizer, schedule and loss normalisation and map the rest into DeepSpeed's config:
the micro-batch and accumulation sizes, gradient clipping, bf16 and the ZeRO stage. DeepSpeed
averages gradients over the data-parallel ranks and (by default) over accumulation steps, while
our loss is already the global mean (summed CE / global token count); ``backward`` therefore
multiplies by the dp size and turns off its accumulation scaling, so the gradients equal a
single-process run's. DeepSpeed clips and steps itself; our LambdaLR schedule stays with the
trainer (it changes the learning rate of the optimizer DeepSpeed wraps).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from eurotrain.config import Config


def deepspeed_config(
    zero_stage: int,
    global_batch: int,
    micro_batch: int,
    dp_size: int,
    grad_clip: float,
    bf16: bool,
) -> dict[str, Any]:
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": global_batch // (micro_batch * dp_size),
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        # our AdamW is a plain torch optimizer, which ZeRO wraps
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """A thin adapter: forward, backward (scaled for parity), step, the global grad norm."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: dict[str, Any],
        dp_size: int,
    ) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        import deepspeed

        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config
        )
        self.dp_size = dp_size

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.engine(*args, **kwargs)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """``loss`` is already this micro-batch's share of the global mean."""
        self.engine.backward(loss * self.dp_size, scale_wrt_gas=False)
        self.engine.step()  # a real optimizer step only at the accumulation boundary

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def module(self) -> nn.Module:
        return self.engine.module


def build_deepspeed(
    cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, dp_size: int, bf16: bool
) -> DeepSpeedEngine:
    t = cfg.train
    config = deepspeed_config(
        cfg.parallel.zero_stage,
        t.global_batch_size,
        t.micro_batch_size,
        dp_size,
        t.grad_clip,
        bf16,
    )
    return DeepSpeedEngine(model, optimizer, config, dp_size)
