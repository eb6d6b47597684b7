"""Retention, discovery of committed/incomplete checkpoints, file-system detection."""

from __future__ import annotations

import json

import pytest

from eurotrain.checkpoint import CheckpointConfig
from eurotrain.checkpoint.directory import FORMAT, MARKER, apply_retention, latest, to_delete
from eurotrain.checkpoint.storage import detect_fs
from eurotrain.configtools import ConfigError


def _commit(root, step, world=1):
    d = root / f"step-{step:06d}"
    d.mkdir(parents=True)
    marker = {"format": FORMAT, "step": step, "world_size": world, "files": {}}
    (d / MARKER).write_text(json.dumps(marker))
    return d


def test_retention_policy():
    assert to_delete([10, 20, 30, 40], keep_last=2, keep_every=0) == [10, 20]
    assert to_delete([10, 20, 30, 40], keep_last=1, keep_every=20) == [10, 30]
    assert to_delete([10, 20, 30], keep_last=0, keep_every=0) == []  # keep all
    assert to_delete([10], keep_last=1, keep_every=0) == []  # never the only one


def test_latest_skips_incomplete_and_retention_cleans_up(tmp_path):
    for step in (10, 20, 30):
        _commit(tmp_path, step)
    (tmp_path / "step-000040.tmp").mkdir()  # a save in progress or torn
    (tmp_path / "step-000050").mkdir()  # no marker
    bad = _commit(tmp_path, 60)
    (bad / MARKER).write_text("{not json")
    found, skipped = latest(tmp_path)
    assert found is not None and found.step == 30
    assert {s.path.name for s in skipped} == {"step-000040.tmp", "step-000050", "step-000060"}
    removed = apply_retention(tmp_path, newest=30, keep_last=2, keep_every=0)
    assert [p.name for p in removed] == ["step-000010"]  # newer incomplete ones are left
    assert (tmp_path / "step-000040.tmp").exists()


def test_detect_fs_longest_prefix(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw 0 0\n"
        "10.0.0.1@o2ib:/scratch /scratch lustre rw 0 0\n"
        "gpfs1 /gpfs/projects gpfs rw 0 0\n"
        "/dev/x /scratch/node\\040local xfs rw 0 0\n"
    )
    assert detect_fs("/scratch/user/ckpt", str(mounts)).fstype == "lustre"
    assert detect_fs("/gpfs/projects/a", str(mounts)).fstype == "gpfs"
    assert detect_fs("/scratch/node local/x", str(mounts)).fstype == "xfs"
    assert detect_fs("/home/x", str(mounts)).fstype == "ext4"
    assert detect_fs(tmp_path, "/nonexistent").source == "statfs"  # the fallback
    assert detect_fs(tmp_path, "/nonexistent").fstype != "unknown"


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"checkpoint\.max_in_flight"):
        CheckpointConfig(max_in_flight=0)
    with pytest.raises(ConfigError, match=r"checkpoint\.lustre_stripe_size"):
        CheckpointConfig(lustre_stripe_size="big")


def test_every_file_is_verified_by_exactly_one_rank_balanced_by_size():
    from eurotrain.checkpoint.verify import share

    files = {f"__{r}_0.distcp": {"size": 100 + r} for r in range(7)}
    files |= {".metadata": {"size": 5}, "config.yaml": {"size": 1}}
    for world in (1, 2, 3, 8):
        shares = [share(files, rank, world) for rank in range(world)]
        names = sorted(n for s in shares for n in s)
        assert names == sorted(n for n in files if n != ".metadata")  # every rank reads that
        loads = [sum(files[n]["size"] for n in s) for s in shares]
        assert max(loads) - min(loads) <= 106, (world, loads)  # at most one file apart


def test_retention_runs_after_the_commit_and_never_fails_a_save(tmp_path, monkeypatch):
    """A sync save returns at its commit; deleting older checkpoints is the checkpoint thread's
    next task, which wait() awaits; a failing deletion is logged and the save stays good."""
    import threading

    import torch

    from eurotrain.checkpoint import checkpointer as ck_mod
    from eurotrain.checkpoint.checkpointer import Checkpointer
    from eurotrain.parallel.engine import ModelState, OptimizerState
    from eurotrain.state import TrainState

    cfg = CheckpointConfig(dir=str(tmp_path), interval=1, keep_last=1, writer="thread")
    logs: list[str] = []
    ck = Checkpointer(cfg, tmp_path, 0, 1, log=logs.append)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()  # optimizer state exists (a fresh one would be initialised by every save)
    parts = {
        "model": ModelState(model),
        "optim": OptimizerState(model, opt),
        "train": TrainState(),
    }
    info = {"tokens_seen": 0, "layout": {}, "config_yaml": "x: 1\n"}
    release = threading.Event()
    real = ck_mod.directory.apply_retention

    def held(root, newest, *args):
        if newest == 2:  # step 1's retention (nothing to delete) runs before save 2 writes
            assert release.wait(30)
        return real(root, newest, *args)

    monkeypatch.setattr(ck_mod.directory, "apply_retention", held)
    ck.save(1, parts, info, sync=True)
    ck.save(2, parts, info, sync=True)  # returns with step 1's deletion still held back
    assert (tmp_path / "step-000002" / MARKER).exists() and (tmp_path / "step-000001").exists()
    release.set()
    ck.wait()
    assert not (tmp_path / "step-000001").exists()
    assert any("removed step-000001 (retention)" in line for line in logs)

    def broken(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "step-000002"))

    monkeypatch.setattr(ck_mod.directory, "apply_retention", broken)
    ck.save(3, parts, info, sync=True)
    ck.close()  # no error: step 3 is committed, step 2 kept
    assert (tmp_path / "step-000003" / MARKER).exists() and (tmp_path / "step-000002").exists()
    assert any("retention after step 3 failed, old checkpoints kept" in line for line in logs)
