"""`eurotrain convert` reads a HF model directory as untrusted files and writes only into its
OUT_DIR: links are followed to regular files only (a hub cache's snapshot is all links), a FIFO
or device is refused before it is read, JSON is read with limits, and neither direction writes
through a symbolic link it finds in OUT_DIR or mixes its files with another model's.

Tiny random HF Llamas are saved with save_pretrained (no downloads) and then rearranged.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import eurotrain.checkpoint.convert as convert_module
from eurotrain.checkpoint.convert import main as convert
from eurotrain.checkpoint.convert import read_model_weights
from eurotrain.cli import main as cli

transformers = pytest.importorskip("transformers")

SHAPE = dict(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A plain HF directory (single file) and a sharded one (index + 3 files), and a reference
    import of the plain one."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**SHAPE), dtype=torch.float32
    )
    model.save_pretrained(root / "plain", safe_serialization=True)
    model.save_pretrained(root / "sharded", safe_serialization=True, max_shard_size="40KB")
    assert len(list((root / "sharded").glob("*.safetensors"))) > 1
    assert convert(["hf-to-eurotrain", str(root / "plain"), str(root / "reference")]) == 0
    return root


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def run_import(hf_dir: Path, out: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli(["convert", "hf-to-eurotrain", str(hf_dir), str(out)])
    return code, capsys.readouterr().err


def same_weights(out: Path, reference: Path) -> None:
    got = read_model_weights(out / "step-000000")
    want = read_model_weights(reference / "step-000000")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def hub_snapshot(src: Path, cache: Path) -> Path:
    """src laid out as huggingface_hub caches it: snapshots/<rev>/NAME -> ../../blobs/<hash>."""
    repo = cache / "models--tiny--llama"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        shutil.copy(f, blobs / f"blob{i:04d}")
        os.symlink(f"../../blobs/blob{i:04d}", snapshot / f.name)
    return snapshot


# ---- accepted: links to regular files ------------------------------------------------------
@pytest.mark.parametrize("layout", ["plain", "sharded"])
def test_hub_cache_snapshot_imports_without_a_note(layout, saved, tmp_path, capsys):
    snapshot = hub_snapshot(saved / layout, tmp_path / "hub")
    assert all(p.is_symlink() for p in snapshot.iterdir())
    code, err = run_import(snapshot, tmp_path / "out", capsys)
    assert code == 0, err
    assert "note" not in err, err  # links into the cache's blobs/ are the normal case
    same_weights(tmp_path / "out", saved / "reference")


def test_a_link_to_weights_elsewhere_is_imported_and_named(saved, tmp_path, capsys):
    """A directory of links to a shared copy of the weights is common on clusters: followed,
    and the files that come from outside HF_DIR are named."""
    shared = tmp_path / "shared" / "model.safetensors"
    shared.parent.mkdir()
    shutil.copy(saved / "plain" / "model.safetensors", shared)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    shutil.copy(saved / "plain" / "config.json", hf_dir)
    os.symlink(shared, hf_dir / "model.safetensors")
    code, err = run_import(hf_dir, tmp_path / "out", capsys)
    assert code == 0, err
    assert (
        f"eurotrain convert: note: model.safetensors is a link to {shared.resolve()}, outside "
        f"{hf_dir}; imported from there"
    ) in err
    same_weights(tmp_path / "out", saved / "reference")


def test_hf_dir_itself_a_link_imports_without_a_note(saved, tmp_path, capsys):
    os.symlink(saved / "plain", tmp_path / "hf")
    code, err = run_import(tmp_path / "hf", tmp_path / "out", capsys)
    assert code == 0 and "note" not in err, err


# ---- refused: files that are not regular files ---------------------------------------------
def fifo(path: Path) -> None:
    os.mkfifo(path)


def dev_zero(path: Path) -> None:
    os.symlink("/dev/zero", path)


def dangling(path: Path) -> None:
    os.symlink("gone.bin", path)


def directory(path: Path) -> None:
    path.mkdir()


NOT_REGULAR = {
    "config.json FIFO": ("config.json", fifo, "config.json: a FIFO, not a regular file"),
    "config.json -> /dev/zero": (
        "config.json", dev_zero, "config.json: a device or socket, not a regular file",
    ),
    "config.json dangling link": (
        "config.json", dangling, "config.json: a symbolic link to gone.bin, which does not exist",
    ),
    "weights FIFO": ("b.safetensors", fifo, "b.safetensors: a FIFO, not a regular file"),
    "weights -> /dev/zero": (
        "b.safetensors", dev_zero, "b.safetensors: a device or socket, not a regular file",
    ),
    "weights directory": (
        "b.safetensors", directory, "b.safetensors: a directory, not a regular file",
    ),
    "index FIFO": (INDEX, fifo, f"{INDEX}: a FIFO, not a regular file"),
}  # fmt: skip


@pytest.mark.timeout(120)  # a regression hangs on the FIFO: fail instead
@pytest.mark.parametrize("case", list(NOT_REGULAR))
def test_fifos_devices_and_dangling_links_are_refused_unread(case, saved, tmp_path, capsys):
    name, make, message = NOT_REGULAR[case]
    hf_dir = copy_dir(saved / "plain", tmp_path / "hf")
    if name == "config.json":
        (hf_dir / name).unlink()
    make(hf_dir / name)
    code, err = run_import(hf_dir, tmp_path / "out", capsys)
    assert code == 1, err
    assert f"eurotrain convert: checkpoint error: {hf_dir}/{message}" in err
    assert "HF_DIR must hold the model's files or links to them" in err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_an_index_that_is_not_an_object_is_refused(saved, tmp_path, capsys):
    hf_dir = copy_dir(saved / "sharded", tmp_path / "hf")
    (hf_dir / INDEX).write_text("[1, 2]")
    code, err = run_import(hf_dir, tmp_path / "out", capsys)
    assert code == 1
    assert f"{hf_dir / INDEX}: no weight_map object of tensor names to file names" in err


# ---- refused: JSON that is not a plausible HF config ---------------------------------------
def write_config(hf_dir: Path, text: str) -> None:
    (hf_dir / "config.json").write_text(text)


def test_deeply_nested_config_is_one_line(saved, tmp_path, capsys):
    hf_dir = copy_dir(saved / "plain", tmp_path / "hf")
    write_config(hf_dir, '{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    code, err = run_import(hf_dir, tmp_path / "out", capsys)
    assert code == 2
    assert err == (
        f"eurotrain convert: configuration error: {hf_dir / 'config.json'}: nested too deeply "
        f"for Python's JSON reader; a HF config nests a few levels\n"
    )

    # Shallow enough for json, too deep for a config: the key is named.
    write_config(hf_dir, '{"model_type": "llama", "x": {"y": ' + "[" * 40 + "]" * 40 + "}}")
    code, err = run_import(hf_dir, tmp_path / "out", capsys)
    assert code == 2
    assert f"{hf_dir / 'config.json'}: x.y" + "[0]" * 31 + " is nested more than 32" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("value", "key", "digits"),
    [
        ('{"vocab_size": 1' + "0" * 5000 + "}", "vocab_size", 5001),  # past int()'s limit
        ('{"rope_scaling": {"factor": -9' + "9" * 19 + "}}", "rope_scaling.factor", 20),
    ],
)
def test_huge_integers_name_their_key(value, key, digits, saved, tmp_path, capsys):
    hf_dir = copy_dir(saved / "plain", tmp_path / "hf")
    write_config(hf_dir, value)
    code, err = run_import(hf_dir, tmp_path / "out", capsys)
    assert code == 2
    assert err == (
        f"eurotrain convert: configuration error: {hf_dir / 'config.json'}: {key} is an "
        f"integer of {digits} digits, more than 64 bits hold; no HF config field needs one\n"
    )


def test_a_number_past_float_range_is_refused_by_name(saved, tmp_path, capsys):
    hf_dir = copy_dir(saved / "plain", tmp_path / "hf")
    text = (hf_dir / "config.json").read_text()
    write_config(hf_dir, text.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e400'))
    code, err = run_import(hf_dir, tmp_path / "out", capsys)
    assert code == 2
    assert "HF config: rms_norm_eps Infinity is not a finite positive number" in err


def test_oversized_config_is_refused(saved, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(convert_module, "MAX_JSON_BYTES", 100)
    hf_dir = copy_dir(saved / "plain", tmp_path / "hf")
    code, err = run_import(hf_dir, tmp_path / "out", capsys)
    assert code == 2
    assert f"{hf_dir / 'config.json'}: more than 100 bytes; not a HF config or index" in err


# ---- OUT_DIR: nothing is written through a link, nothing of the user's overwritten ---------
@pytest.fixture()
def victim(tmp_path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


def test_import_refuses_an_out_dir_config_yaml_it_did_not_write(saved, tmp_path, victim, capsys):
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / "config.yaml")
    code, err = run_import(saved / "plain", out, capsys)
    assert code == 1
    assert f"{out / 'config.yaml'}: exists; choose an empty OUT_DIR" in err
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]  # nothing written


def test_import_leaves_an_existing_out_dir_mode_alone(saved, tmp_path, capsys):
    out = tmp_path / "shared-project"
    out.mkdir()
    out.chmod(0o2775)
    code, err = run_import(saved / "plain", out, capsys)
    assert code == 0, err
    assert out.stat().st_mode & 0o7777 == 0o2775


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", INDEX])
def test_export_refuses_an_out_dir_holding_a_model(name, saved, tmp_path, victim, capsys):
    """A link planted in OUT_DIR would have been written through (overwriting its target); a
    stale file of an earlier export would mix with this one (HF loads a model.safetensors
    before an index)."""
    out = tmp_path / "hf-out"
    out.mkdir()
    os.symlink(victim, out / name)
    capsys.readouterr()
    assert convert(["eurotrain-to-hf", str(saved / "reference"), str(out)]) == 1
    err = capsys.readouterr().err
    assert (
        f"eurotrain convert: checkpoint error: {out}: already holds {name}; export into a new "
        f"directory, or one without config.json, *.safetensors or {INDEX}"
    ) in err
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in out.iterdir()) == [name]


def test_export_into_a_directory_with_other_files(saved, tmp_path, capsys):
    """A tokenizer saved first stays; the directory keeps its mode; no temporary remains."""
    out = tmp_path / "hf-out"
    out.mkdir()
    out.chmod(0o2775)
    (out / "tokenizer.json").write_text("{}")
    assert convert(["eurotrain-to-hf", str(saved / "reference"), str(out), "--max-shard-gb",
                    "0.00004"]) == 0  # fmt: skip
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) > 1 and names == sorted(["config.json", INDEX, "tokenizer.json", *shards])
    assert out.stat().st_mode & 0o7777 == 0o2775
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(back).__name__ == "LlamaForCausalLM"
    assert json.loads((out / INDEX).read_text())["weight_map"]


def test_an_export_cut_short_leaves_no_partial_model(saved, tmp_path, monkeypatch, capsys):
    real = convert_module.save_file
    calls = []

    def disk_full_on_second_shard(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", path)
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(convert_module, "save_file", disk_full_on_second_shard)
    out = tmp_path / "hf-out"
    args = ["eurotrain-to-hf", str(saved / "reference"), str(out), "--max-shard-gb", "0.00004"]
    capsys.readouterr()
    assert convert(args) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert list(out.iterdir()) == []  # neither a shard nor the temporary directory
