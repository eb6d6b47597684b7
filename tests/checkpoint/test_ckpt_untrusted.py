"""A received checkpoint is written by an attacker: crafted pickles never run, on resume (the
trainer and the `eurotrain train` command line) or on `eurotrain convert eurotrain-to-hf`,
even with the commit marker re-signed so that every checksum matches."""

from __future__ import annotations

import contextlib
import enum
import io
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from ckpt_common import tiny_config
from crafted import (
    build_odd_field,
    build_on_class,
    extension_registered,
    newobj_not_listed,
    payloads,
    replace_value,
    resign,
    torch_saved,
)
from multiproc import run_torchrun
from torch.distributed.checkpoint.metadata import Metadata

from eurotrain.checkpoint import CheckpointError
from eurotrain.checkpoint.safe_pickle import Refused, unpickle_metadata
from eurotrain.cli import main as cli
from eurotrain.train import Trainer

# What the one-line error must name for each payload (the global, or the opcode).
NAMED = {
    "dotted-stack-global": "'os.system' of torch.distributed.checkpoint.filesystem",
    "dotted-global-opcode": "'os.system' of torch.distributed.checkpoint.filesystem",
    "dotted-via-pathlib": "'os.system' of pathlib",
    "dotted-inst-opcode": "torch.distributed.checkpoint.filesystem.os.system with the opcode INST",
    "nested-reduce": "'os.system' of torch.distributed.checkpoint.filesystem",
    "builtins-eval": "builtins.eval",
    "builtins-exec": "builtins.exec",
    "builtins-getattr": "the global torch.distributed.checkpoint.filesystem.os",
    "getattr-beyond-members": "calls builtins.getattr with arguments",
    "posix-system": "posix.system",
    "subprocess-popen": "subprocess.Popen",
    **{f"protocol-{p}": "posix.system" for p in range(6)},
    "extension-code": "extension code 61453 (EXT2, registered for posix.system)",
    "persistent-id": "opcode BINPERSID",
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("saved")
    Trainer(tiny_config(out, "run", 2, checkpoint={"interval": 2})).train()
    return out / "run" / "checkpoints" / "step-000002"


def crafted_copy(saved: Path, root: Path, craft: Callable[[bytes], bytes]) -> Path:
    """A copy of the saved checkpoint under root/ with .metadata crafted and the marker
    re-signed."""
    ckpt = root / "step-000002"
    shutil.copytree(saved, ckpt)
    meta = ckpt / ".metadata"
    meta.write_bytes(craft(meta.read_bytes()))
    resign(ckpt)
    return ckpt


def registered(name: str) -> contextlib.AbstractContextManager:
    return extension_registered() if name == "extension-code" else contextlib.nullcontext()


@pytest.mark.parametrize("name", sorted(NAMED))
def test_convert_refuses_crafted_metadata(saved, tmp_path, capsys, name):
    marker = tmp_path / "pwned"
    ckpt = crafted_copy(saved, tmp_path / "ckpts", payloads(marker)[name])
    with registered(name):
        code = cli(["convert", "eurotrain-to-hf", str(ckpt), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert not marker.exists(), "the crafted pickle ran"
    assert code == 1
    assert f"{ckpt / '.metadata'}: " in err and NAMED[name] in err and "refusing" in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "craft, named",
    [
        (build_on_class, "state of the class torch.distributed.checkpoint.metadata.Metadata"),
        (build_odd_field, "sets '__class__' on torch.distributed.checkpoint.metadata.StorageMeta"),
        (newobj_not_listed, "creates torch.Size (NEWOBJ)"),
    ],
)
def test_build_and_newobj_beyond_the_metadata_are_refused(saved, tmp_path, capsys, craft, named):
    ckpt = crafted_copy(saved, tmp_path / "ckpts", craft)
    try:
        code = cli(["convert", "eurotrain-to-hf", str(ckpt), str(tmp_path / "hf")])
        assert not hasattr(Metadata, "eurotrain_pwned"), "BUILD changed a DCP class"
    finally:
        if hasattr(Metadata, "eurotrain_pwned"):
            delattr(Metadata, "eurotrain_pwned")
    err = capsys.readouterr().err
    assert code == 1 and named in err, err


@pytest.mark.parametrize(
    "name", ["dotted-stack-global", "dotted-inst-opcode", "extension-code", "protocol-2"]
)
def test_resume_refuses_crafted_metadata(saved, tmp_path, name):
    marker = tmp_path / "pwned"
    ckpt = crafted_copy(saved, tmp_path / "ckpts", payloads(marker)[name])
    cfg = tiny_config(tmp_path, "run", 3, checkpoint={"resume": str(ckpt)})
    with registered(name), pytest.raises(CheckpointError) as e:
        Trainer(cfg).resume()
    assert not marker.exists(), "the crafted pickle ran"
    assert NAMED[name] in str(e.value) and str(ckpt / ".metadata") in str(e.value)


def test_crafted_value_in_a_data_file_never_runs(saved, tmp_path):
    """DCP unpickles non-tensor values (here the 'train' JSON) with weights_only=False."""

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    ckpt = tmp_path / "ckpts" / "step-000002"
    shutil.copytree(saved, ckpt)
    replace_value(ckpt, "train", torch_saved(Evil()))
    resign(ckpt)
    cfg = tiny_config(tmp_path, "run", 3, checkpoint={"resume": str(ckpt)})
    with pytest.raises(CheckpointError, match=r"value 'train' unreadable .*posix\.system") as e:
        Trainer(cfg).resume()
    assert not (tmp_path / "pwned").exists(), "the crafted pickle ran"
    assert "\n" not in str(e.value)


def test_train_command_refuses_and_runs_nothing(saved, tmp_path):
    """`eurotrain train` on 2 ranks, resume auto into a run directory holding the silent
    payload: one line on rank 0, exit code 1, no command run (it used to resume, exit 0)."""
    marker = tmp_path / "pwned"
    cfg = tiny_config(tmp_path, "run", 3)
    crafted_copy(saved, tmp_path / "run" / "checkpoints", payloads(marker)["dotted-stack-global"])
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    done = run_torchrun(2, [str(tmp_path / "c.yaml")], timeout=300)
    assert not marker.exists(), "the crafted pickle ran"
    assert done.returncode != 0, done.stdout[-2000:]
    lines = [ln for ln in done.stderr.splitlines() if "checkpoint error" in ln]
    assert len(lines) == 1 and NAMED["dotted-stack-global"] in lines[0], done.stderr[-3000:]


@pytest.mark.parametrize("protocol", range(6))
def test_metadata_in_the_protocols_dcp_writes_is_read(saved, protocol):
    """DCP pickles with the default protocol: 4, and 5 from Python 3.14; 2 and 3 read the same
    way. Protocols 0 and 1 need copyreg._reconstructor and are refused."""
    real = pickle.loads((saved / ".metadata").read_bytes())  # our own file: trusted here
    data = pickle.dumps(real, protocol=protocol)
    if protocol < 2:
        with pytest.raises(Refused, match=r"copy_?reg\._reconstructor"):
            unpickle_metadata(data)
    else:
        assert unpickle_metadata(data) == real


class EnumsByName(pickle.Pickler):
    """Pickles enum members as getattr(enum, name), as Python 3.11.2 (Debian 12) does."""

    def reducer_override(self, obj):
        if isinstance(obj, enum.Enum):
            return getattr, (type(obj), obj.name)
        return NotImplemented


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_metadata_with_enum_members_by_name_is_read(saved, protocol):
    """DCP's TensorProperties pickle a memory-format enum member: early Python 3.11 releases
    write getattr(_MEM_FORMAT_ENCODING, name), which eurotrain wrote and must read back."""
    real = pickle.loads((saved / ".metadata").read_bytes())  # our own file: trusted here
    out = io.BytesIO()
    EnumsByName(out, protocol=protocol).dump(real)  # 2: __builtin__.getattr
    data = out.getvalue()
    assert b"getattr" in data and b"TORCH_CONTIGUOUS_FORMAT" in data
    assert unpickle_metadata(data) == real


def test_loaded_values_that_do_not_fit_are_a_checkpoint_error(saved, tmp_path):
    ckpt = tmp_path / "ckpts" / "step-000002"
    shutil.copytree(saved, ckpt)
    replace_value(ckpt, "train", torch_saved('{"step": "two"}'))  # plain text, wrong content
    resign(ckpt)
    cfg = tiny_config(tmp_path, "run", 3, checkpoint={"resume": str(ckpt)})
    with pytest.raises(CheckpointError, match=r"step-000002: rank 0 cannot use its state"):
        Trainer(cfg).resume()
