"""Bit-exact resume in new processes, under the same 2-rank FSDP layout."""

from __future__ import annotations

import json

from ckpt_common import straight_and_saved, train_run
from multiproc import run_distributed


def test_resume_is_bit_exact_with_the_data_order(tmp_path):
    straight, first = run_distributed(straight_and_saved, 2, str(tmp_path))[0]
    ckpt = tmp_path / "split" / "checkpoints" / "step-000005"
    marker = json.loads((ckpt / "COMMITTED.json").read_text())
    assert marker["step"] == 5 and marker["world_size"] == 2
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "config.yaml"} == set(marker["files"])

    # A new process group resumes (checkpoint.resume auto) and runs steps 6..10.
    second = run_distributed(train_run, 2, str(tmp_path), "split", 10, {})[0]
    assert first == straight[:5]
    assert second == straight[5:], "resumed losses differ from the uninterrupted run"
    steps = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").open()]
    assert [s["step"] for s in steps if "loss" in s][-5:] == [6, 7, 8, 9, 10]


def test_sharded_checkpoint_exports_to_hf(tmp_path):
    """A 2-rank FSDP checkpoint (DTensor shards) -> HF: same logits as our model."""
    import torch
    import transformers
    from ckpt_common import tiny_config

    from eurotrain.checkpoint.convert import main as convert
    from eurotrain.checkpoint.convert import read_model_weights
    from eurotrain.models import build_model

    run_distributed(train_run, 2, str(tmp_path), "fsdp", 2, {"checkpoint": {"interval": 2}})
    ckpt = tmp_path / "fsdp" / "checkpoints"
    assert convert(["eurotrain-to-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    ours = build_model(tiny_config(tmp_path, "x", 1).model, "cpu")
    ours.load_state_dict(read_model_weights(ckpt / "step-000002"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=1e-5, atol=1e-5)
