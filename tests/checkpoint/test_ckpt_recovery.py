"""Damaged, missing and mismatched checkpoints: verified before anything is loaded, resume
auto falls back to the newest intact one (all ranks agreeing), a named one is an error."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from ckpt_common import attempts, tiny_config, train_run
from crafted import zero_first_tensor
from multiproc import run_distributed

from eurotrain.checkpoint import CheckpointConfig, CheckpointError
from eurotrain.checkpoint.directory import FORMAT, MARKER
from eurotrain.checkpoint.resume import candidates
from eurotrain.checkpoint.storage import DIGEST
from eurotrain.train import Trainer


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, list[float]]:
    """A 2-rank run of 4 steps with committed checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("saved")
    sections = {"checkpoint": {"interval": 2, "async_save": False}}
    losses = run_distributed(train_run, 2, str(out), "run", 4, sections)[0]
    return out / "run", losses


def copy_run(saved, tmp_path: Path) -> Path:
    """A copy of the saved run directory under tmp_path; returns its checkpoints directory."""
    shutil.copytree(saved[0], tmp_path / "run")
    return tmp_path / "run" / "checkpoints"


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 100)


@pytest.mark.parametrize(
    "damage, verify, named",
    [
        (flip_byte, None, rf"__1_0.distcp: {DIGEST} checksum differs"),  # the default verify
        (truncate, "metadata", r"__1_0.distcp: .* bytes, the commit marker says"),
    ],
)
def test_auto_resume_falls_back_to_the_newest_intact(saved, tmp_path, damage, verify, named):
    ckpts = copy_run(saved, tmp_path)
    damage(ckpts / "step-000004" / "__1_0.distcp")  # checked by one rank only: all must agree
    runs = [("run", 4, {"checkpoint": {"verify": verify} if verify else {}})]
    results = [r[0] for r in run_distributed(attempts, 2, str(tmp_path), runs)]
    for result in results:
        assert "error" not in result, result.get("error")
        assert result["start"] == 2
        assert result["losses"] == saved[1][2:], "resumed losses differ from the original run"
    log = results[0]["log"]
    assert f"warning: checkpoint {ckpts / 'step-000004'} skipped, damaged: " in log
    assert re.search(named, log), log
    assert f"resumed from {ckpts / 'step-000002'}" in log


def test_damage_named_or_found_while_loading_is_an_error_on_every_rank(saved, tmp_path):
    ckpts = copy_run(saved, tmp_path)
    newest = ckpts / "step-000004"
    flip_byte(newest / "__1_0.distcp")
    # Same size, a tensor's zip header zeroed: found only while DCP reads it.
    loading = tmp_path / "loading" / "step-000002"
    shutil.copytree(ckpts / "step-000002", loading)
    zero_first_tensor(loading, "__0_0.distcp")
    one_layer = {"model": {"num_layers": 1}}
    runs = [
        ("a", 4, {"checkpoint": {"resume": str(newest)}}),  # named: no fallback
        ("b", 4, {"checkpoint": {"resume": str(loading), "verify": "metadata"}}),
        ("c", 1, {"checkpoint": {"init_from": str(ckpts / "step-000002")}, **one_layer}),
    ]
    by_rank = run_distributed(attempts, 2, str(tmp_path), runs)
    for results in zip(*by_rank):
        assert all("error" in r for r in results), results
        assert len({r["error"] for r in results}) == 1, "ranks disagree"
    named, loaded, strict = (r["error"] for r in by_rank[0])
    assert f"{newest / '__1_0.distcp'}: {DIGEST} checksum differs" in named
    assert f"{loading}: loading failed on rank 0 (" in loaded and "\n" not in loaded
    assert "holds model.layers.1." in strict and "does not have" in strict


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(saved, tmp_path):
    ckpts = copy_run(saved, tmp_path)
    for step in ("step-000002", "step-000004"):
        flip_byte(ckpts / step / "__0_0.distcp")
    with pytest.raises(CheckpointError) as e:
        Trainer(tiny_config(tmp_path, "run", 6)).resume()
    message = str(e.value)
    assert f"no intact checkpoint in {ckpts} (step-000004: " in message
    assert "step-000002: " in message and "checkpoint.resume none" in message


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the trainer gets as far as building the model."""

    def build(*args, **kwargs):
        raise AssertionError("the model was built before the checkpoint path was checked")

    monkeypatch.setattr("eurotrain.train.build_engine", build)


def test_missing_checkpoint_paths_are_named_before_the_model_is_built(saved, tmp_path, no_model):
    ckpts = copy_run(saved, tmp_path)
    cases = {
        ("resume", str(ckpts / "step-000010")): (
            f"checkpoint.resume: {ckpts / 'step-000010'} does not exist ({ckpts} holds "
            f"step-000004, step-000002)"
        ),
        ("resume", "/nonexistent/step-000010"): (
            "checkpoint.resume: /nonexistent/step-000010 does not exist (/nonexistent does not "
            "exist either)"
        ),
        ("resume", str(ckpts)): (
            f"checkpoint.resume: {ckpts} is a directory of checkpoints, not one checkpoint: "
            f"name one, e.g. {ckpts / 'step-000004'}"
        ),
        ("init_from", str(tmp_path / "hf" / "step-000000")): (
            f"checkpoint.init_from: {tmp_path / 'hf' / 'step-000000'} does not exist"
        ),
    }
    for (key, value), expected in cases.items():
        with pytest.raises(CheckpointError) as e:
            Trainer(tiny_config(tmp_path, "fresh", 1, checkpoint={key: value}))
        assert expected in str(e.value)


@pytest.mark.parametrize(
    "num_layers, resume, expected",
    [
        (1, False, r"holds model\.layers\.1\.\S+(, model\.layers\.1\.\S+)+ .*does not have"),
        (3, False, r"lacks model\.layers\.2\.\S+(, model\.layers\.2\.\S+)+ .*has"),
        (1, True, r"holds model\.layers\.1\..* optim\.(param_groups|state)\.layers\.1\."),
    ],
)
def test_loads_are_strict_about_tensors(saved, tmp_path, num_layers, resume, expected):
    ckpt = str(copy_run(saved, tmp_path) / "step-000002")
    key = "resume" if resume else "init_from"
    cfg = tiny_config(
        tmp_path, "strict", 3, model={"num_layers": num_layers}, checkpoint={key: ckpt}
    )
    with pytest.raises(CheckpointError, match=expected):
        Trainer(cfg).resume()


def test_candidates_tell_torn_from_damaged(tmp_path):
    def commit(step: int, text: str | None) -> None:
        d = tmp_path / f"step-{step:06d}"
        d.mkdir()
        if text is not None:
            (d / MARKER).write_text(text)

    good = {"format": FORMAT, "step": 10, "world_size": 1, "files": {}}
    commit(10, json.dumps(good))
    commit(20, "{not json")  # committed, then damaged
    commit(30, None)  # a deletion cut short: never loaded, no warning
    (tmp_path / "step-000040.tmp").mkdir()
    tried, notes = candidates(CheckpointConfig(dir=str(tmp_path)), tmp_path)
    assert [Path(c.path).name for c in tried] == ["step-000020", "step-000010"]
    assert "unreadable commit marker" in tried[0].problem and not tried[1].problem
    # (the path may hold spaces: TMPDIR is the machine's)
    assert [n.removeprefix("checkpoint ").split(" ignored: ")[0] for n in notes] == [
        str(tmp_path / "step-000040.tmp"),
        str(tmp_path / "step-000030"),
    ]


def test_convert_names_a_missing_checkpoint(tmp_path, capsys):
    from eurotrain.cli import main as cli

    missing = tmp_path / "run" / "step-000001"
    assert cli(["convert", "eurotrain-to-hf", str(missing), str(tmp_path / "hf")]) == 1
    assert f"{missing}: does not exist (nor its parent)" in capsys.readouterr().err
