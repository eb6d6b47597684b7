"""FP8 training through torchao's float8 (``float8:`` section): the block linears compute in
float8 with dynamic scales, everything else (and the master weights, the optimizer, the
gradient reductions) stays as it was.

Applied to the model on the meta device before any parallelism, like torchtitan's model
converters: ``nn.Linear`` -> torchao's ``Float8Linear`` (same parameter names: checkpoints are
unchanged). Tensor parallelism then splits the Float8Linear weights with the usual plan (each
rank casts its shard), and FSDP2 with ``fsdp_all_gather`` all-gathers the weights in float8
(tensorwise recipe: half the bytes of bf16) with the scales precomputed for all layers in one
step after each update.

Which linears: those whose fully qualified name matches no ``exclude`` pattern and whose
in/out features are both at least ``min_features`` and multiples of 16 (FP8 matmuls need that;
small layers are faster in bf16). The output head is never converted: the loss reads its
weight directly (the fused linear + cross-entropy), and it is the layer FP8 hurts most. Nor are
mixture-of-experts routers (their logits are computed from the weight in fp32); the routed
experts are grouped [E, ...] weights, not linears, and stay in the compute dtype; shared experts
convert like any MLP.

FP8 matmuls need NVIDIA compute capability >= 8.9 (H100, H200, GH200, L40S) or AMD MI300;
elsewhere the run is refused before the model is built, unless ``emulate`` (torchao's emulation
in higher precision: for tests on CPUs, slow).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from eurotrain.configtools import ConfigError

TORCHAO_PIN = "torchao==0.18.0"
"""The torchao release checked with torch 2.13 (requirements-pinned.txt)."""


@dataclass
class Float8Config:
    """FP8 training (torchao float8) of the transformer blocks' linear layers."""

    enabled: bool = False
    """Train the block linears in FP8 (needs torchao and an FP8-capable GPU)."""
    recipe: Literal["tensorwise", "rowwise"] = "tensorwise"
    """Scaling granularity: tensorwise (one scale per tensor; fastest, FP8 all-gather under
    FSDP2) or rowwise (one scale per row; more accurate, all-gathers in the compute dtype)."""
    exclude: list[str] = field(default_factory=list)
    """Linear layers (fnmatch patterns on the name, e.g. "layers.0.*" or "*.wk") kept in the
    compute dtype; the output head always is."""
    min_features: int = 1024
    """Linears with fewer input or output features stay in the compute dtype (too small for
    FP8 to pay off)."""
    fsdp_all_gather: bool = True
    """Tensorwise under FSDP2: all-gather the weights in FP8 (scales precomputed after each
    update)."""
    emulate: bool = False
    """torchao's emulation (higher-precision matmuls): runs on any device, for tests only."""

    def __post_init__(self) -> None:
        if self.recipe not in ("tensorwise", "rowwise"):
            raise ConfigError(f"float8.recipe: {self.recipe!r} must be tensorwise or rowwise")
        if self.min_features < 16:
            raise ConfigError(f"float8.min_features: {self.min_features} must be >= 16")


def check_float8(cfg: Float8Config, device: torch.device) -> None:
    """Refuse FP8 where it cannot run: torchao missing, or a device without FP8 matmuls."""
    if not cfg.enabled:
        return
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"float8.enabled needs torchao: pip install '{TORCHAO_PIN}' (or eurotrain[float8])"
        ) from None
    if cfg.emulate:
        return
    problem = _no_fp8(device)
    if problem:
        raise ConfigError(
            f"float8.enabled: {problem}, which has no FP8 matrix units (needs an NVIDIA GPU of "
            f"compute capability >= 8.9: H100, H200, GH200, L40S; or an AMD MI300); set "
            f"float8.enabled false (float8.emulate true runs it emulated, for tests only)"
        )


def _no_fp8(device: torch.device) -> str:
    if device.type != "cuda":
        return f"the run is on {device.type}"
    name = torch.cuda.get_device_name(device)
    if torch.version.hip is not None:
        arch = torch.cuda.get_device_properties(device).gcnArchName
        return "" if arch.startswith("gfx94") or arch.startswith("gfx95") else f"{name} ({arch})"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) >= (8, 9):
        return ""
    return f"{name} has compute capability {major}.{minor}"


def _converts(cfg: Float8Config, fqn: str, module: nn.Module) -> bool:
    if not isinstance(module, nn.Linear) or fqn == "output" or fqn.endswith(".output"):
        return False
    if fqn.endswith(".moe.router"):  # read directly for fp32 logits; routing is precision-bound
        return False
    if any(fnmatch.fnmatchcase(fqn, pattern) for pattern in cfg.exclude):
        return False
    dims = (module.in_features, module.out_features)
    return all(d >= cfg.min_features and d % 16 == 0 for d in dims)


def torchao_config(cfg: Float8Config, fsdp: bool) -> Any:
    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(cfg.recipe)
    return dataclasses.replace(
        config,
        emulate=cfg.emulate,
        enable_fsdp_float8_all_gather=fsdp and cfg.fsdp_all_gather and cfg.recipe == "tensorwise",
    )


def apply_float8(model: nn.Module, cfg: Float8Config, fsdp: bool) -> list[str]:
    """Swap the chosen linears of ``model`` (on any device, meta included) for Float8Linear;
    returns their names."""
    if not cfg.enabled:
        return []
    from torchao.float8 import convert_to_float8_training

    chosen = [fqn for fqn, m in model.named_modules() if _converts(cfg, fqn, m)]
    convert_to_float8_training(
        model,
        config=torchao_config(cfg, fsdp),
        module_filter_fn=lambda module, fqn: _converts(cfg, fqn, module),
    )
    return chosen


def precompute_scales(model_parts: list[nn.Module], cfg: Float8Config, fsdp: bool) -> None:
    """After an update, under FP8 all-gather: every layer's weight scale in one reduction
    (instead of one per layer in the next forward)."""
    if cfg.enabled and torchao_config(cfg, fsdp).enable_fsdp_float8_all_gather:
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        for part in model_parts:
            precompute_float8_dynamic_scale_for_fsdp(part)
