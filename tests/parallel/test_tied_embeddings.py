"""Tied embeddings (model.tie_embeddings) stay one parameter in every layout.

A random tied HF LlamaForCausalLM (built here, no downloads) is converted with ``eurotrain convert
hf-to-eurotrain`` and trained for 20 fp32 steps through checkpoint.init_from, in one process and
under FSDP, HSDP and tensor parallelism; each run must track a plain PyTorch AdamW loop on the HF
model itself (the same batches, lr schedule, clipping and weight-decay grouping), hold exactly
``model.num_params()`` trainable parameters, and export (eurotrain-to-hf) to the logits it
computes. DeepSpeed ZeRO-3 (which does not take init_from) must match a one-process eurotrain
run. The layouts of one world size share one group of processes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from harness import TINY
from multiproc import run_distributed

from eurotrain.checkpoint.convert import main as convert
from eurotrain.cli import main as cli
from eurotrain.config import config_from_dict, load_config
from eurotrain.configtools import ConfigError, from_dict
from eurotrain.data import DataPipeline
from eurotrain.models import ModelConfig
from eurotrain.optim import lr_factor
from eurotrain.parallel import ParallelDims
from eurotrain.parallel.checks import check_layout
from eurotrain.parallel.config import ParallelConfig
from eurotrain.parallel.parallelize import build_parallel_model

transformers = pytest.importorskip("transformers")

STEPS = 20
# fp32 on both sides: differences come from summation order only (seen: <= 1e-7 relative).
# Untied by to_empty(), the same run drifted by 1 % in loss and 0.66 in logits.
LOSS_RTOL = 1e-5
PROBE = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))

HF_TINY = dict(
    vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
)  # fmt: skip


def run_config(out: str, run: str, model: dict, **sections: dict[str, Any]):
    data: dict[str, Any] = {
        "model": model,
        "data": {"corpus": "demo", "tokenizer": "byte", "seq_len": 32, "demo_bytes": 200_000},
        "train": {
            "steps": STEPS, "global_batch_size": 8, "micro_batch_size": 2, "device": "cpu",
            "output_dir": out, "run_name": run,
        },
        "optim": {"lr": 3e-3, "weight_decay": 0.1},
        "schedule": {"warmup_steps": 2},
        "logging": {"log_interval": 100, "progress": "lines"},
    }  # fmt: skip
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data)


def num_params_of(model: dict) -> int:
    return from_dict(ModelConfig, model, "model").num_params()


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def train_layouts(
    rank: int, world: int, layouts: dict[str, dict], model: dict, init_from: str, out: str
) -> dict[str, dict[str, Any]]:
    """Train each layout in turn on this group; what the tests compare, per layout."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from eurotrain.train import Trainer

    results = {}
    for name, layout in layouts.items():
        deepspeed = layout.get("engine") == "deepspeed"
        checkpoint = {} if deepspeed else {"init_from": init_from, "interval": STEPS}
        run = name.replace(" ", "_")
        cfg = run_config(out, run, model, parallel={"dp_shard": 1, **layout}, checkpoint=checkpoint)
        trainer = Trainer(cfg)
        losses = trainer.train().losses
        m = trainer.model
        unique = {id(p): p for p in m.parameters() if p.requires_grad}
        entry: dict[str, Any] = {
            "losses": losses,
            # a DTensor's numel is the full tensor's; ZeRO-3 keeps it in ds_numel
            "num_params": sum(getattr(p, "ds_numel", p.numel()) for p in unique.values()),
            "optim_tensors": sum(len(g["params"]) for g in trainer.optimizer.param_groups),
            "tied": m.output.weight is m.tok_embeddings.weight,
            "param_bytes": sum(_local_bytes(p) for p in unique.values()),
            "run_dir": str(trainer.run_dir),
        }
        if not deepspeed and layout.get("cp", 1) == 1:  # cp: attention wants a sequence shard
            with torch.no_grad():
                logits = m(PROBE)
            logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
            entry["logits"] = logits.tolist()  # tensors would travel through shared memory
        results[name] = entry
    return results


@pytest.fixture(scope="module")
def tied_hf(tmp_path_factory):
    """A random tied HF Llama, its eurotrain conversion, and the plain PyTorch loop's losses."""
    root = tmp_path_factory.mktemp("tied")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_TINY))
    hf.save_pretrained(root / "hf")
    assert cli(["convert", "hf-to-eurotrain", str(root / "hf"), str(root / "et")]) == 0
    converted = yaml.safe_load((root / "et" / "config.yaml").read_text())
    model, init_from = converted["model"], converted["checkpoint"]["init_from"]
    assert model["tie_embeddings"] is True
    cfg = run_config(str(root), "plain", model)
    losses, logits = plain_loop(root / "hf", cfg)
    return {
        "root": root,
        "model": model,
        "init_from": init_from,
        "losses": losses,
        "logits": logits,
    }


def plain_loop(hf_dir: Path, cfg) -> tuple[list[float], torch.Tensor]:
    """AdamW on the HF model itself, mirroring eurotrain/optim.py and the trainer's step: summed
    CE over the global batch / its token count, clip to train.grad_clip, weight decay on
    matrices except norms, the schedule's lr factor."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    hf.train()
    decay, no_decay = [], []
    for name, p in hf.named_parameters():  # the tied lm_head is listed once
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    o = cfg.optim
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=o.lr, betas=tuple(o.betas), eps=o.eps, foreach=True,
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(cfg.schedule, step, cfg.train.steps)
    )
    t = cfg.train
    loader = DataPipeline(cfg.data).train_loader(
        t.global_batch_size, t.micro_batch_size, 0, 1, t.seed
    )
    losses = []
    for _ in range(STEPS):
        batch = next(loader)
        num_tokens = sum(int((y >= 0).sum()) for y in batch.labels)
        total = 0.0
        for x, y in zip(batch.inputs, batch.labels):
            logits = hf(input_ids=x).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
            (loss / num_tokens).backward()
            total += loss.item()
        losses.append(total / num_tokens)
        torch.nn.utils.clip_grad_norm_(hf.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    hf.eval()
    with torch.no_grad():
        return losses, hf(input_ids=PROBE).logits


def _check(name: str, got: dict, tied_hf: dict, num_params: int, world: int) -> list[str]:
    bad = []
    for step, (a, b) in enumerate(zip(got["losses"], tied_hf["losses"])):
        if not math.isclose(a, b, rel_tol=LOSS_RTOL):
            bad.append(f"{name}: loss[{step}] {a} != {b} (plain HF loop)")
    if got["num_params"] != num_params:
        bad.append(f"{name}: {got['num_params']} trainable parameters, expected {num_params}")
    if got["optim_tensors"] != 2 + 9 * 2:  # embedding, final norm, 9 tensors per block
        bad.append(f"{name}: the optimizer holds {got['optim_tensors']} tensors")
    if not got["tied"]:
        bad.append(f"{name}: output.weight is not tok_embeddings.weight")
    logits = torch.tensor(got.get("logits", tied_hf["logits"].tolist()))
    if not torch.allclose(logits, tied_hf["logits"], rtol=1e-3, atol=1e-3):
        diff = (logits - tied_hf["logits"]).abs().max().item()
        bad.append(f"{name}: logits differ from the plain HF loop's by {diff}")
    return bad


def _export_matches(run_dir: str, logits: list, out: Path) -> None:
    assert convert(["eurotrain-to-hf", str(Path(run_dir) / "checkpoints"), str(out)]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = back(input_ids=PROBE).logits
    torch.testing.assert_close(got, torch.tensor(logits), rtol=1e-5, atol=1e-5)


def test_one_process_tracks_plain_hf_loop_and_exports(tied_hf, tmp_path):
    result = train_layouts(0, 1, {"single": {}}, tied_hf["model"], tied_hf["init_from"],
                           str(tmp_path))["single"]  # fmt: skip
    num_params = num_params_of(tied_hf["model"])
    bad = _check("one process", result, tied_hf, num_params, 1)
    if result["param_bytes"] != 4 * num_params:
        bad.append(f"one process: holds {result['param_bytes']} parameter bytes")
    assert not bad, "\n".join(bad)
    _export_matches(result["run_dir"], result["logits"], tmp_path / "back")


TWO_RANKS = {
    "fsdp": {"dp_shard": 2},
    "hsdp replicate": {"dp_replicate": 2, "dp_shard": 1},
    "tp sp": {"tp": 2, "sequence_parallel": True},
}


def test_two_rank_layouts_track_plain_hf_loop(tied_hf, tmp_path):
    per_rank = run_distributed(
        train_layouts, 2, TWO_RANKS, tied_hf["model"], tied_hf["init_from"], str(tmp_path)
    )
    num_params = num_params_of(tied_hf["model"])
    bad = []
    for name in TWO_RANKS:
        for rank, results in enumerate(per_rank):
            bad += _check(f"{name} rank {rank}", results[name], tied_hf, num_params, 2)
    # Bytes each rank holds, the tied weight counted once: FSDP halves everything, the
    # replicas hold it all, tp halves all but the (sequence-parallel, replicated) norms.
    total = 4 * num_params
    model = tied_hf["model"]
    norms = 4 * (2 * model["num_layers"] + 1) * model["dim"]
    expected = {"fsdp": total // 2, "hsdp replicate": total, "tp sp": total // 2 + norms // 2}
    for name, want in expected.items():
        for rank, results in enumerate(per_rank):
            got = results[name]["param_bytes"]
            if got != want:
                bad.append(f"{name} rank {rank}: holds {got} parameter bytes, not {want}")
    assert not bad, "\n".join(bad)
    fsdp = per_rank[0]["fsdp"]
    _export_matches(fsdp["run_dir"], fsdp["logits"], tmp_path / "back-fsdp")
    tp = per_rank[0]["tp sp"]
    _export_matches(tp["run_dir"], tp["logits"], tmp_path / "back-tp")


@pytest.mark.slow
def test_four_rank_hsdp_and_fsdp_tp(tied_hf, tmp_path):
    layouts = {
        "hsdp 2x2": {"dp_replicate": 2, "dp_shard": 2},
        "fsdp x tp": {"dp_shard": 2, "tp": 2},
    }
    per_rank = run_distributed(
        train_layouts, 4, layouts, tied_hf["model"], tied_hf["init_from"], str(tmp_path)
    )
    num_params = num_params_of(tied_hf["model"])
    bad = []
    for name in layouts:
        for rank, results in enumerate(per_rank):
            bad += _check(f"{name} rank {rank}", results[name], tied_hf, num_params, 4)
    for rank, results in enumerate(per_rank):
        got = results["hsdp 2x2"]["param_bytes"]
        if got != 4 * num_params // 2:
            bad.append(f"hsdp rank {rank}: holds {got} parameter bytes, not {4 * num_params // 2}")
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_deepspeed_zero3_matches_one_process(tied_hf, tmp_path):
    """DeepSpeed takes no init_from: both runs start from eurotrain's own (seeded) init."""
    pytest.importorskip("deepspeed")
    model = tied_hf["model"]
    single = train_layouts(0, 1, {"single": {}}, model, "", str(tmp_path / "one"))["single"]
    layouts = {"zero-3": {"engine": "deepspeed", "zero_stage": 3, "dp_shard": 2}}
    per_rank = run_distributed(train_layouts, 2, layouts, model, "", str(tmp_path))
    num_params = num_params_of(model)
    assert single["num_params"] == num_params
    for rank, results in enumerate(per_rank):
        got = results["zero-3"]
        for step, (a, b) in enumerate(zip(got["losses"], single["losses"])):
            assert math.isclose(a, b, rel_tol=1e-5), f"rank {rank} loss[{step}]: {a} != {b}"
        assert got["tied"], f"rank {rank}: output.weight is not tok_embeddings.weight"
        assert got["num_params"] == num_params


def test_layout_checks_accept_tp_and_refuse_pp_with_the_reason():
    tied = ["--model.tie_embeddings", "true"]
    dims = check_layout(load_config(TINY, [*tied, "--parallel.tp", "2"]), 2, cuda=False)
    assert dims.tp == 2
    for schedule in ("1f1b", "zbv"):
        cfg = load_config(TINY, [*tied, "--parallel.pp", "2", "--parallel.pp_schedule", schedule])
        with pytest.raises(ConfigError, match="separate stage modules") as err:
            check_layout(cfg, 2, cuda=False)
        assert "parallel.pp = 1" in str(err.value) and "tie_embeddings = false" in str(err.value)


@pytest.mark.parametrize("layout", [{}, {"compile": True}, {"activation_checkpointing": "full"}])
def test_one_process_build_keeps_the_tie(layout):
    """build_parallel_model materialises with to_empty(); the tie must survive it (compile and
    activation checkpointing wrap the blocks only)."""
    model_cfg = ModelConfig(tie_embeddings=True)
    cfg = ParallelConfig(**layout)
    dims = ParallelDims.from_config(cfg, 1)
    built = build_parallel_model(model_cfg, cfg, dims, None, torch.device("cpu"), torch.float32, 0)
    model = built.model
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == model_cfg.num_params()
