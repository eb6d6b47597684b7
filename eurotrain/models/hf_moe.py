"""HF transformers interop for mixture-of-experts models: Mixtral and Qwen3-MoE.

eurotrain stores a block's experts as three [E, ...] tensors (w1 = gate_proj, w3 = up_proj,
w2 = down_proj). HF checkpoints come in two spellings: transformers 5's fused
``mlp.experts.gate_up_proj`` [E, 2F, D] (gate rows first) and ``mlp.experts.down_proj``
[E, D, F], and the per-expert names of hub checkpoints (Mixtral
``block_sparse_moe.experts.{j}.w1.weight``, Qwen3-MoE ``mlp.experts.{j}.gate_proj.weight``),
which transformers 5 still writes with save_pretrained and converts when it loads. Both are read;
the per-expert spelling is written, which transformers 4 loads too.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from eurotrain.errors import CheckpointError, ConfigError
from eurotrain.models.config import ModelConfig

# Per-expert (legacy) names: the block's prefix and the HF names of w1, w2, w3.
_LEGACY = {
    "mixtral": ("block_sparse_moe", {"w1": "w1", "w2": "w2", "w3": "w3"}),
    "qwen3_moe": ("mlp", {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}),
}
_CLASS = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
_OURS = re.compile(r"layers\.(\d+)\.moe\.(router\.weight|experts\.w[123]|expert_bias)$")


def moe_model_type(cfg: ModelConfig) -> str:
    """qwen3_moe for a model with q/k norms, else mixtral; a ConfigError (one line) names what
    that HF model cannot compute."""
    m = cfg.moe
    model_type = "qwen3_moe" if cfg.qk_norm else "mixtral"
    problems = []
    if m.score_func != "softmax":
        problems.append(f"model.moe.score_func {m.score_func!r} (HF routes by a softmax)")
    if m.num_shared_experts:
        problems.append(f"model.moe.num_shared_experts {m.num_shared_experts}")
    if m.route_scale != 1.0:
        problems.append(f"model.moe.route_scale {m.route_scale}")
    dense = [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)]
    if model_type == "mixtral":
        if dense:
            problems.append(
                f"dense blocks {dense} (model.moe.dense_layers / every; Qwen3-MoE has them "
                f"but also q/k norms)"
            )
        if not m.norm_topk_prob:
            problems.append(
                "model.moe.norm_topk_prob false (Mixtral always renormalises the chosen scores; "
                "Qwen3-MoE, with q/k norms, has the switch)"
            )
        if cfg.attention_bias:
            problems.append("model.attention_bias")
    if cfg.qkv_bias and not cfg.attention_bias:
        problems.append("q/k/v biases without an o_proj bias (model.qkv_bias)")
    if cfg.mlp_bias and dense:
        problems.append("model.mlp_bias")
    if problems:
        raise ConfigError(
            f"model: {', '.join(problems)} has no place in HF's {_CLASS[model_type]} (the "
            f"closest HF model); export is refused rather than written as a different model"
        )
    return model_type


def moe_hf_config(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    """The expert fields of config.json (over the dense ones to_hf_config writes)."""
    m = cfg.moe
    d: dict[str, Any] = {
        "num_experts_per_tok": m.top_k,
        "router_aux_loss_coef": m.aux_loss_coef,
        "output_router_logits": False,
    }
    if model_type == "mixtral":
        # Every block is MoE: intermediate_size is the experts' size.
        d.update(
            num_local_experts=m.num_experts,
            intermediate_size=cfg.expert_ffn_dim,
            router_jitter_noise=0.0,
            sliding_window=cfg.sliding_window,
        )
        return d
    d.update(
        num_experts=m.num_experts,
        moe_intermediate_size=cfg.expert_ffn_dim,
        norm_topk_prob=m.norm_topk_prob,
        decoder_sparse_step=m.every,
        mlp_only_layers=sorted(set(m.dense_layers)),
        attention_bias=cfg.attention_bias,
        use_sliding_window=cfg.sliding_window is not None,
        sliding_window=cfg.sliding_window,
    )
    return d


def experts_to_hf(
    state: dict[str, torch.Tensor], model_type: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(HF per-expert tensors of every MoE block, the rest of ``state``). A selection bias that
    aux-loss-free balancing moved off zero is refused: it changes which experts a token uses,
    and HF's softmax routers have no place for it."""
    prefix, names = _LEGACY[model_type]
    out: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _OURS.match(key)
        if m is None:
            rest[key] = value
            continue
        layer, part = m.group(1), m.group(2)
        block = f"model.layers.{layer}.{prefix}"
        if part == "expert_bias":
            if torch.count_nonzero(value):
                raise CheckpointError(
                    f"{key} is nonzero (max |bias| {value.abs().max().item():.3g}): the "
                    f"aux-loss-free selection bias (model.moe.bias_update_rate) changes which "
                    f"experts a token uses and HF's {_CLASS[model_type]} has no place for it; "
                    f"export is refused"
                )
        elif part == "router.weight":
            out[f"{block}.gate.weight"] = value
        else:
            name = names[part.split(".")[1]]
            for j, expert in enumerate(value.unbind(0)):
                # A copy: views of one storage cannot be saved as separate safetensors.
                out[f"{block}.experts.{j}.{name}.weight"] = expert.clone()
    return out, rest


def experts_from_hf(
    state: dict[str, torch.Tensor], cfg: ModelConfig, model_type: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(eurotrain tensors of every MoE block, HF tensors not used). Each block's experts are
    read from either spelling (not both); a missing expert or a misshapen tensor is a
    CheckpointError naming it. Leftover expert names of other blocks stay in the rest, which the
    caller reports as tensors the model has no place for."""
    rest = dict(state)
    out: dict[str, torch.Tensor] = {}
    e, f, d = cfg.moe.num_experts, cfg.expert_ffn_dim, cfg.dim
    prefix, names = _LEGACY[model_type]
    for i in range(cfg.num_layers):
        if not cfg.is_moe_layer(i):
            continue
        fused = f"model.layers.{i}.mlp.experts"
        legacy = f"model.layers.{i}.{prefix}"
        spellings = dict.fromkeys((f"{legacy}.gate.weight", f"model.layers.{i}.mlp.gate.weight"))
        routers = [n for n in spellings if n in rest]
        if len(routers) > 1:
            raise CheckpointError(
                f"HF weights: {' and '.join(routers)} are both block {i}'s router"
            )
        if routers:
            out[f"layers.{i}.moe.router.weight"] = rest.pop(routers[0])
        numbered = re.compile(re.escape(f"{legacy}.experts.") + r"\d+\.")
        per_expert = [n for n in rest if numbered.match(n)]
        fused_names = [n for n in (f"{fused}.gate_up_proj", f"{fused}.down_proj") if n in rest]
        if per_expert and fused_names:
            raise CheckpointError(
                f"HF weights: block {i} holds both fused and per-expert expert tensors "
                f"({fused_names[0]}, {per_expert[0]}); keep one spelling"
            )
        if fused_names:
            out.update(_from_fused(rest, fused, i, (e, f, d)))
        elif per_expert:
            out.update(_from_per_expert(rest, legacy, names, i, (e, f, d)))
        out[f"layers.{i}.moe.expert_bias"] = torch.zeros(e, dtype=torch.float32)
    return out, rest


def _take(rest: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    t = rest.pop(name, None)
    if t is not None and (tuple(t.shape) != shape or not t.is_floating_point()):
        raise CheckpointError(
            f"HF weights: {name} is {t.dtype} {list(t.shape)}, config.json asks for a float "
            f"tensor of shape {list(shape)}"
        )
    return t


def _from_fused(
    rest: dict[str, torch.Tensor], fused: str, i: int, dims: tuple[int, int, int]
) -> dict[str, torch.Tensor]:
    e, f, d = dims
    out = {}
    gate_up = _take(rest, f"{fused}.gate_up_proj", (e, 2 * f, d))
    if gate_up is not None:
        out[f"layers.{i}.moe.experts.w1"] = gate_up[:, :f].clone()
        out[f"layers.{i}.moe.experts.w3"] = gate_up[:, f:].clone()
    down = _take(rest, f"{fused}.down_proj", (e, d, f))
    if down is not None:
        out[f"layers.{i}.moe.experts.w2"] = down
    return out  # a missing one is reported with the other missing tensors


def _from_per_expert(
    rest: dict[str, torch.Tensor],
    legacy: str,
    names: dict[str, str],
    i: int,
    dims: tuple[int, int, int],
) -> dict[str, torch.Tensor]:
    e, f, d = dims
    out = {}
    shapes = {"w1": (f, d), "w3": (f, d), "w2": (d, f)}
    for ours, theirs in names.items():
        wanted = [f"{legacy}.experts.{j}.{theirs}.weight" for j in range(e)]
        missing = [n for n in wanted if n not in rest]
        if missing:
            raise CheckpointError(
                f"HF weights: block {i} lacks {len(missing)} expert tensor(s): "
                f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"
            )
        parts = [_take(rest, n, shapes[ours]) for n in wanted]
        out[f"layers.{i}.moe.experts.{ours}"] = torch.stack(parts)  # type: ignore[arg-type]
    return out


def fused_hf_name(name: str) -> str | None:
    """The HF (transformers 5) name of an expert tensor, for messages; None for other names."""
    m = _OURS.match(name)
    if m is None:
        return None
    layer, part = m.group(1), m.group(2)
    theirs = {
        "router.weight": "mlp.gate.weight",
        "experts.w1": "mlp.experts.gate_up_proj",
        "experts.w3": "mlp.experts.gate_up_proj",
        "experts.w2": "mlp.experts.down_proj",
        "expert_bias": "(eurotrain's expert_bias)",
    }[part]
    return f"model.layers.{layer}.{theirs}"
