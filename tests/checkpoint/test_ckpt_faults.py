"""Crashes, corruption and a full disk: the last good checkpoint survives, errors are clear."""

from __future__ import annotations

import os
import pickle
import subprocess
from pathlib import Path

import pytest
from ckpt_common import tiny_config
from crafted import resign
from multiproc import run_torchrun

from eurotrain.checkpoint import CheckpointError
from eurotrain.checkpoint.checkpointer import ENOSPC_HOOK, KILL_HOOK
from eurotrain.checkpoint.directory import latest, read_marker
from eurotrain.checkpoint.safe_metadata import read_metadata
from eurotrain.checkpoint.storage import DIGEST
from eurotrain.checkpoint.verify import verify_checkpoint
from eurotrain.train import Trainer


def test_rank_killed_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "run", 4, checkpoint={"interval": 2})
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    # Rank 0 dies half-way through writing step 4 (were it alive, it would remove the failed
    # save's directory itself; dead, it leaves a torn step-4.tmp behind, as a node crash does).
    monkeypatch.setenv(KILL_HOOK, "0:4")
    done = run_torchrun(2, [str(tmp_path / "c.yaml")], timeout=120)
    assert done.returncode != 0, "the killed rank should fail the job"
    root = tmp_path / "run" / "checkpoints"
    found, bad = latest(root)
    assert found is not None and found.step == 2
    assert [b.path.name for b in bad] == ["step-000004.tmp"]

    # Resume (here in one process: a reshard too) skips the torn save and redoes step 4.
    monkeypatch.delenv(KILL_HOOK)
    result = Trainer(cfg).train()
    assert len(result.losses) == 2  # steps 3 and 4
    found, bad = latest(root)
    assert found is not None and found.step == 4 and not bad


@pytest.fixture
def one_checkpoint(tmp_path) -> Path:
    Trainer(tiny_config(tmp_path, "run", 2, checkpoint={"interval": 2})).train()
    return tmp_path / "run" / "checkpoints" / "step-000002"


def test_truncated_shard_is_named(one_checkpoint, tmp_path):
    shard = one_checkpoint / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size - 100)
    cfg = tiny_config(tmp_path, "run", 4, checkpoint={"interval": 2})
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: .* bytes, the commit marker says"):
        Trainer(cfg).resume()


def test_bit_flip_is_detected_by_full_verify(one_checkpoint):
    shard = one_checkpoint / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    verify_checkpoint(one_checkpoint, "metadata")  # sizes and metadata only: a flipped bit passes
    with pytest.raises(CheckpointError, match=rf"__0_0\.distcp: {DIGEST} checksum differs"):
        verify_checkpoint(one_checkpoint, "full")


@pytest.mark.parametrize("algorithm", ["sha256", "blake2b"])
def test_markers_of_older_checksums_still_verify_and_resume(one_checkpoint, tmp_path, algorithm):
    """Checkpoints written before the pieces record whole-file SHA-256 (2026-11-24/25), and
    before that blake2b: still checked and read."""
    marker = read_marker(one_checkpoint)
    assert all(set(e) == {"size", DIGEST} for e in marker["files"].values()), marker["files"]
    resign(one_checkpoint, algorithm)
    verify_checkpoint(one_checkpoint, "full")
    cfg = tiny_config(tmp_path, "run", 4, checkpoint={"interval": 2})
    assert Trainer(cfg).resume() is not None
    shard = one_checkpoint / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"__0_0\.distcp: {algorithm} checksum differs"):
        verify_checkpoint(one_checkpoint, "full")


def test_crafted_metadata_is_never_unpickled(one_checkpoint, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    meta = one_checkpoint / ".metadata"
    meta.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match=rf"\.metadata: .*{DIGEST} differs from the commit"):
        verify_checkpoint(
            one_checkpoint, "metadata"
        )  # first line of defence: the marker's size/checksum
    marker = read_marker(one_checkpoint)
    with pytest.raises(CheckpointError, match=r"refers to the global (posix|os)\.system"):
        read_metadata(one_checkpoint, marker, check_sum=False)  # second: the unpickler
    assert not (tmp_path / "pwned").exists()


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True)
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(path)]
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


@pytest.mark.parametrize("direct_io", ["never", "always"])
def test_full_disk_fails_loudly_and_keeps_last_good(tmp_path, monkeypatch, direct_io):
    disk = tmp_path / "small"
    # A real 3 MiB tmpfs holds one 2.3 MiB checkpoint, not two; without root to mount one,
    # the writer's test hook raises ENOSPC at step 4 instead. With direct_io: always the full
    # disk is met by O_DIRECT writes (where tmpfs takes them) or by the page-cache fallback.
    mounted = _mount_tmpfs(disk, "3M")
    if not mounted:
        disk.mkdir(exist_ok=True)
        monkeypatch.setenv(ENOSPC_HOOK, "4")
    try:
        ckpt = {"interval": 2, "dir": str(disk), "direct_io": direct_io}
        cfg = tiny_config(tmp_path, "run", 4, checkpoint=ckpt)
        with pytest.raises(Exception, match="No space left on device"):
            Trainer(cfg).train()
        found, bad = latest(disk)
        assert found is not None and found.step == 2 and not bad  # torn step 4 removed
        verify_checkpoint(found.path, "full")
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)
