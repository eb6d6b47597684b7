"""DeepSpeed ZeRO (stages 1-3) as the alternative data-parallel engine, behind the Engine calls.

We keep our optimizer, schedule and loss normalisation and map the rest into DeepSpeed's config:
the micro-batch and accumulation sizes, gradient clipping, bf16 and the ZeRO stage. DeepSpeed
averages gradients over the data-parallel ranks, while our loss is already the global mean
(summed CE / global token count): ``forward_backward`` multiplies by the dp size and turns off its
accumulation scaling, so the gradients equal a single-process run's. DeepSpeed clips and updates
in its own ``step()``; our LambdaLR schedule stays with the trainer.

Non-finite steps: ZeRO runs our (fused) AdamW on its partitions of the fp32 master weights, so the
update is skipped on the device through AdamW's ``found_inf`` flag, decided on the loss (DeepSpeed
computes the gradient norm only inside its step). A non-finite gradient norm with a finite loss has
already changed the weights when it is seen: the run stops at once (the last checkpoint is intact).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from eurotrain.errors import CheckpointError, NonFiniteLossError
from eurotrain.optim import build_optimizer
from eurotrain.parallel.parallelize import build_parallel_model

if TYPE_CHECKING:
    from eurotrain.config import Config
    from eurotrain.data import Batch
    from eurotrain.parallel.dims import ParallelDims
    from eurotrain.parallel.engine import Precision
    from eurotrain.state import Stateful


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
    def __init__(
        self, cfg: Config, dims: ParallelDims, device: torch.device, precision: Precision
    ) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        import deepspeed

        self.device, self.precision = device, precision
        self.dp_size = dims.dp
        built = build_parallel_model(
            cfg.model, cfg.parallel, dims, None, device, precision.compute_dtype, cfg.train.seed
        )
        model = built.model
        optimizer = build_optimizer(model, cfg.optim)
        t = cfg.train
        config = deepspeed_config(
            cfg.parallel.zero_stage,
            t.global_batch_size,
            t.micro_batch_size,
            dims.dp,
            t.grad_clip,
            precision.compute_dtype == torch.bfloat16,
        )
        self.engine, self.ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config
        )
        self.optimizer: torch.optim.Optimizer = optimizer  # ours, run by ZeRO on its partitions
        self.model: nn.Module = self.engine.module
        self.model_parts = [self.model]

    def state(self) -> dict[str, Stateful]:
        return {"model": _NoState(), "optim": _NoState()}

    def forward_backward(self, batch: Batch, num_tokens: float) -> torch.Tensor:
        self.engine.train()
        loss_sum = torch.zeros((), device=self.device)
        last = len(batch.inputs) - 1
        for i, (x, y) in enumerate(zip(batch.inputs, batch.labels)):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.precision.context():
                loss = self.engine(x, y)
            self.engine.backward(loss * (self.dp_size / num_tokens), scale_wrt_gas=False)
            if i != last:  # accumulation; the update comes with the last micro-batch in step()
                self.engine.step()
            loss_sum += loss.detach().float()
        return loss_sum

    def reduce_loss(self, loss_sum: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(loss_sum)
        return loss_sum

    def step(self, max_norm: float, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        del max_norm  # DeepSpeed clips to gradient_clipping itself
        nonfinite = ~torch.isfinite(loss)
        if self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = nonfinite.float()  # type: ignore[attr-defined]
        elif nonfinite.item():
            raise NonFiniteLossError(
                f"loss {loss.item()} is not finite and optim.fused is off: DeepSpeed cannot skip "
                f"the update. Set optim.fused true (or null), lower optim.lr, or check the data"
            )
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        grad_norm = torch.as_tensor(float("nan") if norm is None else norm, device=self.device)
        if not torch.isfinite(grad_norm).item() and not nonfinite.item():
            raise NonFiniteLossError(
                f"gradient norm {grad_norm.item()} is not finite with a finite loss: DeepSpeed "
                f"has applied the update already, so the run stops; resume from the last "
                f"checkpoint with a lower optim.lr or check the data"
            )
        return grad_norm.float(), nonfinite

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> torch.Tensor:
        self.engine.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for x, y in zip(batch.inputs, batch.labels):
            x, y = x.to(self.device), y.to(self.device)
            with self.precision.context():
                total += self.engine(x, y).double()
        return total


class _NoState:
    """Checkpoints of DeepSpeed runs are refused up front by check_layout; this is the guard."""

    def state_dict(self) -> dict[str, Any]:
        raise CheckpointError("checkpoints do not cover parallel.engine = deepspeed yet")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state_dict()
