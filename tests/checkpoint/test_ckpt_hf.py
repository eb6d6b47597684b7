"""HF transformers interop: random tiny Llama -> eurotrain -> (trainer, 0 steps) -> HF; a trained
mixture of experts -> HF."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from ckpt_common import tiny_config

from eurotrain.checkpoint.convert import main as convert
from eurotrain.cli import main as cli
from eurotrain.train import Trainer

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("tie", [False, True])
def test_hf_round_trip_keeps_logits(tmp_path, tie):
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        want = hf(tokens).logits

    assert cli(["convert", "hf-to-eurotrain", str(tmp_path / "hf"), str(tmp_path / "et")]) == 0
    run_cfg = yaml.safe_load((tmp_path / "et" / "config.yaml").read_text())
    assert run_cfg["model"]["tie_embeddings"] is tie

    # Continued pretraining starts from it: the trainer loads it via checkpoint.init_from,
    # then (0 steps trained) saves its own full checkpoint, which is exported back.
    model = {k: run_cfg["model"][k] for k in ("dim", "num_layers", "ffn_dim", "tie_embeddings")}
    cfg = tiny_config(
        tmp_path, "run", 1, model=model, checkpoint={**run_cfg["checkpoint"], "interval": 1}
    )
    trainer = Trainer(cfg)
    assert trainer.resume() is not None and trainer.state.step == 0
    with torch.no_grad():
        ours = trainer.model(tokens)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    trainer.checkpointer.save(0, trainer.checkpoint_parts(), trainer.run_info(), sync=True)
    trainer.checkpointer.close()
    ckpt = tmp_path / "run" / "checkpoints"
    assert convert(["eurotrain-to-hf", str(ckpt), str(tmp_path / "back")]) == 0

    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        got = back(tokens).logits
    assert torch.equal(got, want), (got - want).abs().max()
    assert json.loads((tmp_path / "back" / "config.json").read_text())["tie_word_embeddings"] is tie


def test_pickled_weights_are_refused_with_a_clear_error(tmp_path, capsys):
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2)
    )  # fmt: skip
    hf.config.to_json_file(tmp_path / "config.json")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle: never read
    assert convert(["hf-to-eurotrain", str(tmp_path), str(tmp_path / "out")]) == 1
    assert "no *.safetensors files (pytorch_model.bin is not read" in capsys.readouterr().err


def test_export_refuses_a_tied_checkpoint_whose_matrices_differ(tmp_path, monkeypatch, capsys):
    """A checkpoint saved while the tie had come apart (eurotrain before it re-tied the weights
    after materialising them) holds two trained matrices: a tied export would drop one."""
    import eurotrain.checkpoint.convert as convert_module

    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 tie_word_embeddings=True)
    )  # fmt: skip
    hf.save_pretrained(tmp_path / "hf")
    real = convert_module.from_hf_state_dict

    def came_apart(state, cfg):
        weights = dict(real(state, cfg))
        weights["output.weight"] = weights["tok_embeddings.weight"] + 1
        return weights

    monkeypatch.setattr(convert_module, "from_hf_state_dict", came_apart)
    assert convert(["hf-to-eurotrain", str(tmp_path / "hf"), str(tmp_path / "et")]) == 0
    capsys.readouterr()
    assert convert(["eurotrain-to-hf", str(tmp_path / "et"), str(tmp_path / "back")]) == 1
    err = capsys.readouterr().err
    assert "output.weight differs from tok_embeddings.weight" in err and "--untie" in err

    untied = tmp_path / "untied"
    assert convert(["eurotrain-to-hf", str(tmp_path / "et"), str(untied), "--untie"]) == 0
    assert json.loads((untied / "config.json").read_text())["tie_word_embeddings"] is False
    back = transformers.AutoModelForCausalLM.from_pretrained(untied)
    emb = hf.model.embed_tokens.weight
    assert torch.equal(back.lm_head.weight, emb + 1)
    assert torch.equal(back.model.embed_tokens.weight, emb)


@pytest.mark.parametrize("rate", [0.0, 0.05])
def test_trained_moe_checkpoint_exports_unless_its_expert_bias_moved(tmp_path, rate, capsys):
    """A Qwen3-MoE shaped run (q/k norms, a dense first block) trained 3 steps exports to
    Qwen3MoeForCausalLM with the trainer's logits; with aux-loss-free balancing its learned
    selection bias has no place in HF's router, and the export says so in one line."""
    # 3 steps: each bias moves by +-rate per step, so an odd number of moves cannot cancel out.
    moe = {"num_experts": 4, "top_k": 2, "expert_ffn_dim": 32, "dense_layers": [0],
           "aux_loss_coef": 0.01, "bias_update_rate": rate}  # fmt: skip
    cfg = tiny_config(
        tmp_path, "run", 3, model={"qk_norm": True, "moe": moe}, checkpoint={"interval": 3}
    )
    trainer = Trainer(cfg)
    trainer.train()
    trainer.checkpointer.close()
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(tokens)
    ckpt = tmp_path / "run" / "checkpoints"
    capsys.readouterr()
    code = convert(["eurotrain-to-hf", str(ckpt), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    if rate:
        assert code == 1 and "moe.expert_bias is nonzero" in err and err.count("\n") == 1, err
        return
    assert code == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, want, rtol=1e-5, atol=1e-5)
