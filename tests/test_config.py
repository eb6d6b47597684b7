"""Config loading, overrides and validation: each bad input gives a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from eurotrain.config import Config, load_config
from eurotrain.configtools import ConfigError, parse_overrides

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_presets_load(preset: str) -> None:
    cfg = load_config(REPO / "configs" / preset)
    assert cfg.model.num_params() > 0


def test_preset_sizes() -> None:
    sizes = {n: load_config(REPO / f"configs/{n}.yaml").model.num_params() for n in (
        "tiny", "llama3.2-1b", "llama3-8b", "llama3-70b", "qwen3-0.6b", "mistral-7b")}  # fmt: skip
    assert 0.5e6 < sizes["tiny"] < 1.5e6
    assert round(sizes["llama3-8b"] / 1e9, 2) == 8.03  # HF Meta-Llama-3-8B: 8.03B
    assert round(sizes["llama3-70b"] / 1e9, 1) == 70.6
    assert round(sizes["llama3.2-1b"] / 1e9, 2) == 1.24
    assert sizes["qwen3-0.6b"] == 596_049_920  # HF Qwen/Qwen3-0.6B
    assert sizes["mistral-7b"] == 7_241_732_096  # HF mistralai/Mistral-7B-v0.1


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config(
        REPO / "configs/tiny.yaml",
        ["--optim.lr", "1e-4", "--train.steps=7", "--model.rope_scaling.factor", "2"],
    )
    assert cfg.optim.lr == 1e-4 and cfg.train.steps == 7
    assert cfg.model.rope_scaling.factor == 2.0
    assert cfg.model.dim == 128  # untouched values come from the file


def test_unknown_key_names_nearest() -> None:
    with pytest.raises(ConfigError, match=r"'optim.lrr'.*did you mean 'optim.lr'"):
        load_config(None, ["--optim.lrr", "3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*did you mean 'train'"):
        load_config(None, ["--trian.steps", "3"])


def test_wrong_type_names_field_value_and_allowed() -> None:
    with pytest.raises(ConfigError, match=r"train.steps: expected an integer, got 'ten'"):
        load_config(None, ["--train.steps", "ten"])
    with pytest.raises(ConfigError, match=r"schedule.name: 'cosin' is not allowed.*'cosine'"):
        load_config(None, ["--schedule.name", "cosin"])
    with pytest.raises(ConfigError, match=r"model.tie_embeddings: expected true or false"):
        load_config(None, ["--model.tie_embeddings", "maybe"])


def test_impossible_values() -> None:
    with pytest.raises(
        ConfigError, match=r"model.num_kv_heads: 3 must divide model.num_heads \(4\)"
    ):
        load_config(None, ["--model.num_kv_heads", "3"])
    with pytest.raises(ConfigError, match=r"train.steps: 0 must be >= 1"):
        load_config(None, ["--train.steps", "0"])
    with pytest.raises(ConfigError, match=r"data.seq_len \(4096\) exceeds model.max_seq_len"):
        load_config(None, ["--data.seq_len", "4096"])
    with pytest.raises(ConfigError, match=r"optim.lr: -1.0 must be > 0"):
        load_config(None, ["--optim.lr", "-1"])
    with pytest.raises(ConfigError, match=r"parallel.zero_bucket_size: 0 must be a positive"):
        load_config(None, ["--parallel.zero_bucket_size", "0"])


def test_non_divisible_batch() -> None:
    with pytest.raises(
        ConfigError, match=r"global_batch_size \(10\) is not a multiple of .*micro_batch_size \(4\)"
    ):
        load_config(None, ["--train.global_batch_size", "10", "--train.micro_batch_size", "4"])


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist.*Did you mean .*tiny.yaml"):
        load_config(REPO / "configs/tiny.yml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dim: 64\n   num_layers: 2\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"must hold a mapping"):
        load_config(listy)


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match=r"overrides look like --section.key value"):
        parse_overrides(["lr=3"])
    with pytest.raises(ConfigError, match=r"names no section"):
        parse_overrides(["--lr", "3"])
    with pytest.raises(ConfigError, match=r"has no value"):
        parse_overrides(["--optim.lr"])


def test_base_include_and_yaml_round_trip(tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {REPO / 'configs/tiny.yaml'}\ntrain:\n  steps: 3\n")
    cfg = load_config(child)
    assert cfg.train.steps == 3 and cfg.model.dim == 128
    again = tmp_path / "resolved.yaml"
    again.write_text(cfg.to_yaml())
    assert load_config(again) == cfg
    assert yaml.safe_load(cfg.to_yaml())["model"]["num_kv_heads"] == 2


def test_defaults_are_valid() -> None:
    assert isinstance(Config(), Config)


def test_a_directory_as_config_says_so_and_suggests_a_yaml_inside(tmp_path: Path) -> None:
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "tiny.yaml").write_text("train: {steps: 2}\n")
    with pytest.raises(ConfigError, match=r"is a directory, not a YAML file.*cfgs/tiny\.yaml"):
        load_config(tmp_path / "cfgs")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"is a directory, not a YAML file"):
        load_config(tmp_path / "empty")


def test_base_cycles_name_the_chain(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: b.yaml\ntrain: {steps: 2}\n")
    (tmp_path / "b.yaml").write_text("base: sub/c.yaml\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text("base: ../a.yaml\n")
    with pytest.raises(ConfigError, match=r"a\.yaml -> .*b\.yaml -> .*c\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match=r"includes itself"):
        load_config(tmp_path / "self.yaml")
    # A file may be the base of two others (a diamond is no cycle).
    (tmp_path / "root.yaml").write_text("train: {steps: 5}\n")
    (tmp_path / "left.yaml").write_text("base: root.yaml\n")
    (tmp_path / "twice.yaml").write_text("base: left.yaml\noptim: {lr: 0.5}\n")
    assert load_config(tmp_path / "twice.yaml").train.steps == 5


def test_bad_base_values_and_undecodable_files(tmp_path: Path) -> None:
    (tmp_path / "listbase.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"'base:' must be the path of another YAML file"):
        load_config(tmp_path / "listbase.yaml")
    (tmp_path / "gone.yaml").write_text("base: nothere.yaml\n")
    with pytest.raises(ConfigError, match=r"nothere\.yaml.*named by 'base:' in .*gone\.yaml"):
        load_config(tmp_path / "gone.yaml")
    (tmp_path / "latin1.yaml").write_bytes(b"train:\n  run_name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xe9 at offset 22\)"):
        load_config(tmp_path / "latin1.yaml")


def test_fault_section_sets_the_collective_timeout() -> None:
    assert load_config(None).fault.collective_timeout_s == 240
    cfg = load_config(None, ["--fault.collective_timeout_s", "30"])
    assert cfg.fault.collective_timeout_s == 30.0
    for bad in ("0", "-5"):
        with pytest.raises(ConfigError, match=r"fault\.collective_timeout_s: .* must be > 0"):
            load_config(None, ["--fault.collective_timeout_s", bad])
