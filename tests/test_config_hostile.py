"""Config files and overrides written to hurt: each is refused at load with one line that names
the file (or override), the key and the fix, and the legitimate form next to it still loads."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest

from eurotrain.config import Config, TrainingConfig, load_config
from eurotrain.configtools import ConfigError, from_dict, load_yaml, shown
from eurotrain.models.config import RopeScaling
from eurotrain.optim import OptimConfig


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _refused(path: Path | None, message: str, overrides: list[str] | None = None) -> None:
    """Loading fails with exactly ``message`` ({path} stands for repr(str(path)))."""
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    assert str(e.value) == message.format(path=repr(str(path)))


def _laughs(levels: int) -> str:
    """The "billion laughs": each anchor lists the previous one nine times (9**levels values)."""
    lines = ["  k0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"  k{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "train:\n  steps:\n" + "\n".join("  " + line for line in lines) + "\n"


# --- aliases, anchors and merge keys ------------------------------------------------------


def test_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    # Nine levels expand to 387 million strings: safe_load returned them shared, and the type
    # error's repr built them all (45 s, 6.5 GB). The sixth level (line 8) is the first past the
    # limit.
    _refused(
        _write(tmp_path, _laughs(9)),
        "config file {path}: the value at line 8 expands through its aliases (*name) to more "
        "than 100,000 values; write the settings out instead of nesting aliases",
    )


def test_alias_expansion_below_the_limit_loads() -> None:
    data = load_yaml(_laughs(5), "t")  # 9**5 = 59,049 strings
    level = data["train"]["steps"]["k4"]
    assert len(level) == 9 and len(level[0][0][0][0]) == 9 and level[8][8][8][8][8] == "lol"


def test_alias_chains_deeper_than_the_limit_are_refused() -> None:
    text = "a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 60))
    with pytest.raises(ConfigError) as e:
        load_yaml(text, "config file 'c.yaml'")
    assert str(e.value) == (
        "config file 'c.yaml': the value at line 50 expands through its aliases (*name) to more "
        "than 50 levels of nesting; write the settings out instead of nesting aliases"
    )


def test_recursive_alias_is_refused() -> None:
    for text in ("a: &a [1, *a]\n", "a: &a {x: *a}\n"):
        with pytest.raises(ConfigError) as e:
            load_yaml(text, "config file 'c.yaml'")
        assert str(e.value) == (
            "config file 'c.yaml': the value anchored at line 1 contains an alias to itself; a "
            "config cannot be infinite: remove that alias"
        )


def test_small_anchors_aliases_and_merge_keys_still_work(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "data:\n"
        "  seq_len: &len 64\n"
        "model:\n"
        "  max_seq_len: *len\n"
        "  rope_scaling: &rs {factor: 8.0, original_max_position_embeddings: 32}\n"
        "train: {<<: {steps: 9, seed: 4}, steps: 5, eval_batches: &n 3, gc_interval: *n}\n",
    )
    cfg = load_config(path)
    assert cfg.data.seq_len == cfg.model.max_seq_len == 64
    assert cfg.model.rope_scaling.factor == 8.0
    # A merged key may be overridden: that is what merge keys are for, not a duplicate.
    assert (cfg.train.steps, cfg.train.seed, cfg.train.eval_batches) == (5, 4, 3)
    assert cfg.train.gc_interval == 3


# --- duplicate keys -----------------------------------------------------------------------


def test_a_second_section_is_refused_not_silently_kept(tmp_path: Path) -> None:
    # Two people's edits: the second train: block replaced the first, steps 50000 became 100.
    path = _write(
        tmp_path,
        "base: tiny\ntrain:\n  steps: 50000\n  global_batch_size: 512\noptim:\n"
        "  lr: 1.0e-3\ntrain:\n  seed: 3\n",
    )
    _refused(
        path,
        "config file {path}: key 'train' appears twice in one mapping, at line 2 and line 7; "
        "YAML would keep only the second: merge them into one",
    )


def test_a_key_twice_inside_a_section_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "train:\n  steps: 5\n  seed: 1\n  'steps': 7\n")
    _refused(
        path,
        "config file {path}: key 'steps' appears twice in one mapping, at line 2 and line 4; "
        "YAML would keep only the second: merge them into one",
    )
    # The same key in different mappings is no duplicate.
    assert load_yaml("- {a: 1}\n- {a: 2}\n", "t") == [{"a": 1}, {"a": 2}]


def test_a_duplicate_in_an_override_value_is_refused() -> None:
    _refused(
        None,
        "override --optim.betas: key 'x' appears twice in one mapping, at line 1 and line 1; "
        "YAML would keep only the second: merge them into one",
        ["--optim.betas", "{x: 1, x: 2}"],
    )


# --- nesting and integer size -------------------------------------------------------------


def test_deep_nesting_is_a_config_error_not_a_recursion_error(tmp_path: Path) -> None:
    _refused(
        _write(tmp_path, "model:\n  name: " + "[" * 5000 + "]" * 5000 + "\n"),
        "config file {path}: nested more than 50 levels deep at line 2; a config needs a few "
        "levels (section: key: value)",
    )
    _refused(
        _write(tmp_path, "train: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", "map.yaml"),
        "config file {path}: nested more than 50 levels deep at line 1; a config needs a few "
        "levels (section: key: value)",
    )
    _refused(
        None,
        "override --train.steps: nested more than 50 levels deep at line 1; a config needs a "
        "few levels (section: key: value)",
        ["--train.steps", "[" * 2000],
    )


def test_integers_longer_than_python_reads_are_a_config_error(tmp_path: Path) -> None:
    _refused(
        _write(tmp_path, "train:\n  steps: 1" + "0" * 5000 + "\n"),
        "config file {path}: the integer at line 2 is 5001 characters long, more than the 4300 "
        "digits Python reads; no setting needs one that large",
    )
    # Readable but beyond int64: the central range check, with the value cut short.
    _refused(
        _write(tmp_path, "train:\n  steps: 1" + "0" * 4000 + "\n", "long.yaml"),
        "train.steps: <an integer of about 4001 digits> is out of range; a config integer lies "
        "between -2**63 and 2**63 - 1",
    )
    _refused(
        None,
        "train.steps: 1e+300 is out of range; a config integer lies between -2**63 and 2**63 - 1",
        ["--train.steps", "1.0e+300"],
    )
    assert load_config(None, ["--train.steps", "1.0e+6"]).train.steps == 1_000_000


# --- values shown in messages -------------------------------------------------------------


def test_messages_show_a_bounded_repr_of_any_value() -> None:
    shared: Any = ["lol"] * 9
    for _ in range(9):  # 9**10 elements, as an alias bomb loads: lists shared, not copied
        shared = [shared] * 9
    with pytest.raises(ConfigError) as e:
        from_dict(Config, {"train": {"steps": shared}})
    assert str(e.value) == (
        "train.steps: expected an integer, got [[[[...], [...], [...], [...], ...], [[...], "
        "[...], [...], [...], ...], [[...], [...], [...], [...], ...], [[...], [...], [...], "
        "[...], ...], ...], [[[...], ..."
    )
    with pytest.raises(ConfigError) as e:
        from_dict(Config, {"schedule": {"name": "x" * 10**7}})
    assert str(e.value) == (
        f"schedule.name: '{'x' * 27}...{'x' * 28}' is not allowed; choose one of 'cosine', "
        f"'wsd', 'constant'"
    )
    with pytest.raises(ConfigError) as e:
        from_dict(Config, {"y" * 10**6: 1})
    assert str(e.value).startswith(f"unknown config key '{'y' * 27}...{'y' * 28}': valid keys")
    assert shown(10**10000) == "<an integer of about 10001 digits>"
    assert shown(b"z" * 100) == repr(b"z" * 60) + "..."
    assert shown([0.9, 0.95]) == "[0.9, 0.95]" and shown("cosine") == "'cosine'"


# --- nan and inf --------------------------------------------------------------------------


def _float_fields(cls: type, prefix: str = "") -> typing.Iterator[str]:
    """Dotted names of every float setting in the config tree (float, float | None, list)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _float_fields(typing.cast(type, tp), f"{prefix}{f.name}.")
        elif tp is float or float in typing.get_args(tp):
            yield prefix + f.name


FLOAT_FIELDS = list(_float_fields(Config))


def test_every_float_setting_is_found() -> None:
    for key in ("optim.lr", "train.grad_clip", "train.peak_tflops", "model.norm_eps"):
        assert key in FLOAT_FIELDS
    assert "model.rope_scaling.low_freq_factor" in FLOAT_FIELDS and len(FLOAT_FIELDS) > 20


@pytest.mark.parametrize("key", FLOAT_FIELDS)
def test_nan_and_inf_are_refused_for_every_float_setting(key: str) -> None:
    for raw in (".nan", ".inf", "-.inf", "nan", "1e999"):
        shown_value = {".nan": "nan", ".inf": "inf", "-.inf": "-inf"}.get(raw, repr(raw))
        _refused(
            None,
            f"{key}: {shown_value} is not a finite number; write a finite value (nan and inf "
            f"are refused for every setting)",
            [f"--{key}", raw],
        )


def test_nan_inside_a_list_and_floats_beyond_range_are_refused() -> None:
    _refused(
        None,
        "optim.betas[1]: nan is not a finite number; write a finite value (nan and inf are "
        "refused for every setting)",
        ["--optim.betas", "[0.9, .nan]"],
    )
    _refused(
        None,
        "optim.lr: <an integer of about 400 digits> is beyond the largest float (about "
        "1.8e308); write a realistic value",
        ["--optim.lr", "1" + "0" * 399],
    )
    cfg = load_config(None, ["--optim.lr", "3e-4", "--optim.betas", "[0.9, 0.95]"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == [0.9, 0.95]


# --- ranges the code relies on ------------------------------------------------------------

RANGE_CASES = [
    # models/rope.py divides by both factors (0: ZeroDivisionError; negative: a wrong model).
    (
        ["--model.rope_scaling.factor", "8", "--model.rope_scaling.low_freq_factor", "0"],
        "model.rope_scaling.low_freq_factor: 0.0 must be > 0 (Llama 3.1 uses low_freq_factor 1 "
        "and high_freq_factor 4)",
    ),
    (
        [
            "--model.rope_scaling.low_freq_factor",
            "-2",
            "--model.rope_scaling.high_freq_factor",
            "-1",
        ],
        "model.rope_scaling.low_freq_factor: -2.0 must be > 0 (Llama 3.1 uses low_freq_factor 1 "
        "and high_freq_factor 4)",
    ),
    (
        ["--model.rope_scaling.high_freq_factor", "0"],
        "model.rope_scaling.high_freq_factor: 0.0 must be > 0 (Llama 3.1 uses low_freq_factor 1 "
        "and high_freq_factor 4)",
    ),
    (
        ["--model.rope_scaling.factor", "8", "--model.rope_scaling.high_freq_factor", "1"],
        "model.rope_scaling: high_freq_factor (1.0) must exceed low_freq_factor (1.0)",
    ),
    (
        ["--model.rope_scaling.original_max_position_embeddings", "0"],
        "model.rope_scaling.original_max_position_embeddings: 0 must be >= 1 (8192 for Llama 3.1)",
    ),
    (["--model.norm_eps", "0"], "model.norm_eps: 0.0 must be > 0 (the default is 1e-5)"),
    (["--model.init_std", "-0.02"], "model.init_std: -0.02 must be > 0 (the default is 0.02)"),
    (["--model.rope_theta", "0"], "model.rope_theta: 0.0 must be > 0 (the default is 10000)"),
    (["--optim.eps", "0"], "optim.eps: 0.0 must be > 0 (the default is 1e-8)"),
    (["--optim.weight_decay", "-0.1"], "optim.weight_decay: -0.1 must be >= 0 (0 = off)"),
    (["--train.grad_clip", "-1"], "train.grad_clip: -1.0 must be >= 0 (0 = off)"),
    (
        ["--train.peak_tflops", "0"],
        "train.peak_tflops: 0.0 must be > 0 (the device's bf16 peak in TFLOP/s), or null to look "
        "it up from the GPU's name",
    ),
    (
        ["--train.peak_tflops", "-1"],
        "train.peak_tflops: -1.0 must be > 0 (the device's bf16 peak in TFLOP/s), or null to "
        "look it up from the GPU's name",
    ),
    # numpy refuses a negative seed inside the first step; torch one beyond 64 bits.
    (
        ["--train.seed", "-1"],
        "train.seed: -1 must be between 0 and 2**63 - 1 (any such integer; the default is 0)",
    ),
    (
        ["--train.seed", str(2**63)],
        "train.seed: 9223372036854775808 is out of range; a config integer lies between -2**63 "
        "and 2**63 - 1",
    ),
    (
        ["--train.seed", "1.0e+30"],
        "train.seed: 1e+30 is out of range; a config integer lies between -2**63 and 2**63 - 1",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), RANGE_CASES)
def test_values_the_code_cannot_use_are_refused(overrides: list[str], message: str) -> None:
    _refused(None, message, overrides)


def test_the_edges_of_those_ranges_still_load(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "--train.seed", str(2**63 - 1), "--train.grad_clip", "0", "--train.peak_tflops",
            "989.4", "--model.rope_scaling.factor", "8", "--model.rope_scaling.low_freq_factor",
            "0.5", "--model.rope_scaling.high_freq_factor", "4", "--model.norm_eps", "1e-6",
        ],
    )  # fmt: skip
    assert cfg.train.seed == 2**63 - 1 and cfg.train.grad_clip == 0.0  # 0 = no clipping
    assert cfg.train.peak_tflops == 989.4 and cfg.model.rope_scaling.low_freq_factor == 0.5
    assert load_config(None).train.peak_tflops is None  # null: looked up from the GPU's name
    assert load_config(None, ["--train.seed", "0"]).train.seed == 0
    preset = Path(__file__).resolve().parents[1] / "configs" / "llama3.2-1b.yaml"
    assert load_config(preset).model.rope_scaling.factor > 1  # Llama 3.1 scaling as shipped


def test_the_checks_hold_for_configs_built_in_python() -> None:
    """A dataclass built directly skips the loader's nan check; its own checks still refuse."""
    with pytest.raises(ConfigError, match=r"^train.grad_clip: nan must be >= 0"):
        TrainingConfig(grad_clip=float("nan"))
    with pytest.raises(ConfigError, match=r"^optim.lr: nan must be > 0"):
        OptimConfig(lr=float("nan"))
    with pytest.raises(ConfigError, match=r"^model.rope_scaling.low_freq_factor: nan must be"):
        RopeScaling(low_freq_factor=float("nan"))


# --- the run directory's config.yaml, read back by status, the run-identity check and export --


def test_a_run_directory_config_is_read_with_the_same_loader(tmp_path: Path) -> None:
    from eurotrain.identity import check_run_dir
    from eurotrain.status import report

    (tmp_path / "config.yaml").write_text(_laughs(9))
    with pytest.raises(ConfigError, match=r"config.yaml: the value at line \d+ expands"):
        report(tmp_path)
    with pytest.raises(ConfigError, match=r"config.yaml: the value at line \d+ expands"):
        check_run_dir(tmp_path, {"train": {"steps": 1}}, allow_change=False)


@pytest.mark.parametrize(
    "key, value, says",
    [
        ("max_seq_len", 2**24 + 1, "more than the 16,777,216 positions the fp32 RoPE tables"),
        ("vocab_size", 2**32 + 1, "more than 4,294,967,296, the ids that prepared data"),
    ],
)
def test_model_sizes_past_what_the_code_can_represent(key: str, value: int, says: str) -> None:
    with pytest.raises(ConfigError, match=f"model.{key}: {value} is {says}"):
        load_config(None, [f"--model.{key}", str(value)])
    load_config(None, [f"--model.{key}", str(2**24 if key == "max_seq_len" else 2**32)])
