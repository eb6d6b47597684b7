"""DeepSpeed ZeRO (stages 1-3) as the alternative data-parallel engine, behind the Engine calls.

We keep our optimizer, schedule and loss normalisation and map the rest into DeepSpeed's config:
the micro-batch and accumulation sizes, gradient clipping, bf16 and the ZeRO stage. DeepSpeed
averages gradients over the data-parallel ranks, while our loss is already the global mean
(summed CE / global token count): ``forward_backward`` multiplies by the dp size and turns off its
accumulation scaling, so the gradients equal a single-process run's. DeepSpeed clips and updates
in its own ``step()``; our LambdaLR schedule stays with the trainer.

Checkpoints: the model and optimizer state are exchanged per parameter name as full fp32 tensors,
gathered from and scattered into ZeRO's partitions by DeepSpeed's safe_get/set_full_* helpers,
under the same keys an FSDP run saves (``model.<fqn>``, ``optim.state.<fqn>.exp_avg`` ...). So a
DeepSpeed checkpoint resumes bit-exactly under any ZeRO stage and data-parallel size. Each tensor
is kept by one rank (chosen by name), so a rank holds about 1/world of the full state while
saving; on loading, its keeper broadcasts it to the others, one tensor at a time.

Non-finite steps: ZeRO runs our (fused) AdamW on its partitions of the fp32 master weights, so the
update is skipped on the device through AdamW's ``found_inf`` flag, decided on the loss (DeepSpeed
computes the gradient norm only inside its step). A non-finite gradient norm with a finite loss has
already changed the weights when it is seen: the run stops at once (the last checkpoint is intact).
"""

from __future__ import annotations

import os
import zlib
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from eurotrain.errors import NonFiniteLossError
from eurotrain.optim import build_optimizer
from eurotrain.parallel.parallelize import build_parallel_model

if TYPE_CHECKING:
    from eurotrain.config import Config
    from eurotrain.data import Batch
    from eurotrain.parallel.dims import ParallelDims
    from eurotrain.parallel.engine import Precision, Veto
    from eurotrain.state import Stateful


def deepspeed_config(
    zero_stage: int,
    global_batch: int,
    micro_batch: int,
    dp_size: int,
    grad_clip: float,
    bf16: bool,
    bucket_size: int = 500_000_000,
) -> dict[str, Any]:
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": global_batch // (micro_batch * dp_size),
        "gradient_clipping": grad_clip,
        "zero_optimization": {
            "stage": zero_stage,
            "reduce_bucket_size": bucket_size,
            "allgather_bucket_size": bucket_size,
        },
        # our AdamW is a plain torch optimizer, which ZeRO wraps
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def import_deepspeed() -> Any:
    """Import DeepSpeed for training: the accelerator chosen and its shared-memory all-reduce off.

    On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce when its comm backend
    starts (about a minute per fresh environment) and maps about 66 MiB of /dev/shm per rank. It
    serves only DeepSpeed's inference all-reduce; training collectives go through
    torch.distributed. Where /dev/shm is smaller than the ranks need (64 MiB is Docker's default)
    a rank waits forever for its peer's segment, so the whole job hangs. We mark the op unusable
    before the backend starts, so DeepSpeed neither builds nor maps it.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class DeepSpeedEngine:
    def __init__(
        self, cfg: Config, dims: ParallelDims, device: torch.device, precision: Precision
    ) -> None:
        deepspeed = import_deepspeed()

        self.device, self.precision = device, precision
        self.dp_size = dims.dp
        built = build_parallel_model(
            cfg.model, cfg.parallel, dims, None, device, precision.compute_dtype, cfg.train.seed
        )
        model = built.model
        optimizer = build_optimizer(model, cfg.optim)
        by_param = {p: n for n, p in model.named_parameters()}
        # Each group's parameter names, kept before ZeRO swaps in its flat partitions.
        self._group_names = [[by_param[p] for p in g["params"]] for g in optimizer.param_groups]
        t = cfg.train
        config = deepspeed_config(
            cfg.parallel.zero_stage,
            t.global_batch_size,
            t.micro_batch_size,
            dims.dp,
            t.grad_clip,
            precision.compute_dtype == torch.bfloat16,
            cfg.parallel.zero_bucket_size,
        )
        self.engine, self.ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config
        )
        self.optimizer: torch.optim.Optimizer = optimizer  # ours, run by ZeRO on its partitions
        self.model: nn.Module = self.engine.module
        self.model_parts = [self.model]

    def state(self) -> dict[str, Stateful]:
        return {"model": _FullState(self, "model"), "optim": _FullState(self, "optim")}

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

    def step(
        self, max_norm: float, loss: torch.Tensor, veto: Veto | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        del max_norm  # DeepSpeed clips to gradient_clipping itself
        skip = ~torch.isfinite(loss)
        if veto is not None:  # DeepSpeed's norm exists only after its update: the loss alone
            skip = skip | veto(loss, None)
        if self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = skip.float()  # type: ignore[attr-defined]
        elif skip.item():
            raise NonFiniteLossError(
                f"loss {loss.item()} is not finite (or a spike) and optim.fused is off: DeepSpeed "
                f"cannot skip the update. Set optim.fused true (or null), lower optim.lr, or "
                f"check the data"
            )
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        grad_norm = torch.as_tensor(float("nan") if norm is None else norm, device=self.device)
        if not torch.isfinite(grad_norm).item() and not skip.item():
            raise NonFiniteLossError(
                f"gradient norm {grad_norm.item()} is not finite with a finite loss: DeepSpeed "
                f"has applied the update already, so the run stops; resume from the last "
                f"checkpoint with a lower optim.lr or check the data"
            )
        return grad_norm.float(), skip

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> torch.Tensor:
        self.engine.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for x, y in zip(batch.inputs, batch.labels):
            x, y = x.to(self.device), y.to(self.device)
            with self.precision.context():
                total += self.engine(x, y).double()
        return total

    # ---- checkpoint state: full fp32 tensors per parameter name ------------------------------
    def _rank_and_world(self) -> tuple[int, int]:
        if dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _keeper(self, name: str) -> int:
        """The rank that keeps ``name``'s tensors in a checkpoint: a stable spread by name."""
        return zlib.crc32(name.encode()) % self._rank_and_world()[1]

    def _named_params(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _hyper_params(self) -> dict[str, dict[str, Any]]:
        """{parameter name: its optimizer group's hyper-parameters}, as FSDP runs save them."""
        out = {}
        for name, group in zip(self._group_names, self.optimizer.param_groups):
            hyper = {k: v for k, v in group.items() if k != "params"}
            out.update(dict.fromkeys(name, hyper))
        return out

    def full_state(self, part: str) -> dict[str, Any]:
        """This rank's share of the full state: every rank takes part in each gather (they are
        collectives), only the keeper keeps the result."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._materialize_adam_state()
        rank = self._rank_and_world()[0]
        step = torch.tensor(float(self._adam_step()))
        hyper = self._hyper_params() if part == "optim" else {}
        out: dict[str, Any] = {}
        for name, p in self._named_params():
            if part == "model":
                values = {name: safe_get_full_fp32_param(p)}
            else:
                values = {f"state.{name}.{k}": safe_get_full_optimizer_state(p, k) for k in _ADAM}
            if self._keeper(name) != rank:
                continue
            out.update({k: v.detach().to("cpu", copy=True) for k, v in values.items()})
            if part == "optim":
                out[f"state.{name}.step"] = step.clone()
                out.update({f"param_groups.{name}.{k}": v for k, v in hyper[name].items()})
        return out

    def load_full_state(self, part: str, state: dict[str, Any]) -> None:
        """Scatter full tensors into ZeRO's partitions: each keeper broadcasts its tensors."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self._materialize_adam_state()
        step = None
        for name, p in self._named_params():
            if part == "model":
                value = self._broadcast(name, state.get(name), p)
                safe_set_full_fp32_param(p, value)
                self._set_module_param(p, value)
                continue
            for k in _ADAM:
                value = self._broadcast(name, state.get(f"state.{name}.{k}"), p)
                safe_set_full_optimizer_state(p, value, k)
            if f"state.{name}.step" in state:
                step = int(state[f"state.{name}.step"].item())
        if part == "optim":
            step_box = torch.tensor([float(-1 if step is None else step)], device=self.device)
            if dist.is_initialized():
                dist.all_reduce(step_box, op=dist.ReduceOp.MAX)
            self._set_adam_step(int(step_box.item()))

    def _broadcast(self, name: str, value: torch.Tensor | None, p: nn.Parameter) -> torch.Tensor:
        """The keeper's full tensor of ``name``, on every rank (on this rank's device)."""
        shape = tuple(getattr(p, "ds_shape", p.shape))
        keeper = self._keeper(name)
        if value is None:
            value = torch.empty(shape, dtype=torch.float32, device=self.device)
        value = value.to(self.device, torch.float32).reshape(shape).contiguous()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(value, src=keeper)
        return value

    def _set_module_param(self, p: nn.Parameter, value: torch.Tensor) -> None:
        """The module's own copy (ZeRO-1/2: the whole tensor on every rank; ZeRO-3: a partition)
        follows the fp32 master weights only at the next update: set it now."""
        import deepspeed

        if hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if self._rank_and_world()[0] == 0:
                    p.data.copy_(value)
        else:
            p.data.copy_(value)

    # The inner AdamW: ZeRO runs it on flat fp32 partitions; its state exists after a first step.
    def _zero_partitions(self) -> list[tuple[int, torch.Tensor]]:
        """(param group index, flat fp32 partition) of every partition ZeRO steps."""
        zero = self.ds_optimizer
        if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3
            return [
                (zero.sub_group_to_group_id[i], flat)
                for i, flat in enumerate(zero.fp32_partitioned_groups_flat)
            ]
        return list(enumerate(zero.single_partition_of_fp32_groups))  # ZeRO-1/2

    def _materialize_adam_state(self) -> None:
        """Create AdamW's state (zero moments, step 0) where no update has run yet, through one
        update that fused AdamW skips (found_inf): loading needs the tensors to write into."""
        # (DeepSpeed's early link leaves empty entries: an empty state is no state.)
        partitions = [(g, f) for g, f in self._zero_partitions() if not self.optimizer.state.get(f)]
        if not partitions:
            self._link_optimizer_state()
            return
        saved = [list(group["params"]) for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["params"] = []
        for g, flat in partitions:
            self.optimizer.param_groups[g]["params"].append(flat)
            flat.grad = torch.zeros_like(flat)
        self.optimizer.found_inf = torch.ones((), device=self.device)  # type: ignore[attr-defined]
        self.optimizer.step()
        for _, flat in partitions:
            flat.grad = None
        for group, params in zip(self.optimizer.param_groups, saved):
            group["params"] = params
        self.optimizer.found_inf = torch.zeros((), device=self.device)  # type: ignore[attr-defined]
        self._link_optimizer_state()

    def _link_optimizer_state(self) -> None:
        """ZeRO-1/2 point each parameter's fragment at the optimizer state, which
        safe_get/set_full_optimizer_state read through. DeepSpeed (0.19) links every group after
        the first group's first step, when the other groups have no state yet, and never again:
        their fragments stay empty. Link again now that every group's state exists."""
        zero = self.ds_optimizer
        if hasattr(zero, "_hp_optimizer_states_linked"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def _adam_step(self) -> int:
        steps = {int(s["step"].item()) for s in self.optimizer.state.values() if "step" in s}
        assert len(steps) <= 1, f"ZeRO's partitions disagree on the AdamW step: {steps}"
        return steps.pop() if steps else 0

    def _set_adam_step(self, step: int) -> None:
        for s in self.optimizer.state.values():
            if "step" in s:
                s["step"].fill_(float(step))


class _FullState:
    """The Stateful view of one part ("model" or "optim") of a DeepSpeed engine."""

    def __init__(self, engine: DeepSpeedEngine, part: str) -> None:
        self.engine, self.part = engine, part

    def state_dict(self) -> dict[str, Any]:
        return self.engine.full_state(self.part)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_full_state(self.part, state)


_ADAM = ("exp_avg", "exp_avg_sq")
