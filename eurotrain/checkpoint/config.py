"""Checkpoint settings: where, how often, how many to keep, how to resume and verify."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from eurotrain.configtools import ConfigError


@dataclass
class CheckpointConfig:
    """Checkpointing (saving, resuming, retention, integrity, parallel-file-system layout)."""

    dir: str = ""
    """Checkpoint directory; empty means '<run dir>/checkpoints'."""
    interval: int | Literal["auto"] = 0
    """Save every this many steps (plus a final save at the end); 0 disables saving. auto:
    from the measured save stall and the job's mean time between failures (fault.mtbf_hours)
    by Young/Daly, re-measured at every save and logged (eurotrain/checkpoint/interval.py)."""
    async_save: bool = True
    """Stage to CPU memory and write in a background thread while training continues."""
    max_in_flight: int = 1
    """Async saves allowed in flight; starting one more first waits for the oldest."""
    writer: Literal["process", "thread"] = "process"
    """Who writes this rank's data file (hashing it as it goes): a writer process per rank,
    off the training process's GIL (process; Linux), or a thread of the training process
    (thread; also the fallback where memfd is missing)."""
    direct_io: Literal["never", "sync", "always"] = "never"
    """Which saves write their data files with O_DIRECT from aligned bounce buffers, past the
    page cache: never (all through the page cache), sync (the saves training waits for: sync
    saves, the final save, the save a stop signal asks for), or always. Which is faster depends
    on the file system and the size per rank: measure with benchmarks/checkpoint.py
    --direct-io (docs/checkpointing.md). Where the file system refuses O_DIRECT the write goes
    through the page cache and the commit's log line says so."""
    keep_last: int = 3
    """Committed checkpoints to keep (newest first); 0 keeps all."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this forever; 0 disables."""
    resume: str = "auto"
    """auto: the newest committed checkpoint in dir that verifies (damaged newer ones are
    skipped with a warning; none intact is an error); none: start fresh; or a path to one
    checkpoint directory (step-N), which must verify."""
    init_from: str = ""
    """A checkpoint whose model weights (only) start a fresh run, e.g. one made by
    'eurotrain convert hf-to-eurotrain'; ignored when a resume checkpoint is found. Its model
    tensors must match this model's exactly."""
    verify: Literal["full", "metadata", "none"] = "full"
    """Before loading, check files against the commit marker: size and checksum of every file,
    split across ranks (full: reads the checkpoint once more); sizes of all files and the checksum
    of the DCP metadata only (metadata: misses flipped bits in data files); nothing (none)."""
    allow_config_change: bool = False
    """Resume a run directory although the keys that define the run changed since it was
    written (eurotrain/identity.py); without it such a directory is refused, naming the
    changes."""
    lustre_stripe_count: int = 4
    """On Lustre: OSTs each new checkpoint file is striped over (-1 = all)."""
    lustre_stripe_size: str = "16M"
    """On Lustre: stripe size (lfs setstripe -S syntax, e.g. 4M, 16M)."""

    def __post_init__(self) -> None:
        if isinstance(self.interval, str) and self.interval != "auto":
            raise ConfigError(
                f"checkpoint.interval: {self.interval!r} must be a number of steps (0 = off) or "
                f"auto"
            )
        for key in ("interval", "keep_last", "keep_every"):
            if not isinstance(getattr(self, key), str) and getattr(self, key) < 0:
                raise ConfigError(f"checkpoint.{key}: {getattr(self, key)} must be >= 0 (0 = off)")
        if self.max_in_flight < 1:
            raise ConfigError(f"checkpoint.max_in_flight: {self.max_in_flight} must be >= 1")
        if self.writer not in ("process", "thread"):
            raise ConfigError(f"checkpoint.writer: {self.writer!r} must be process or thread")
        if self.direct_io not in ("never", "sync", "always"):
            raise ConfigError(
                f"checkpoint.direct_io: {self.direct_io!r} must be one of never, sync, always"
            )
        if not self.resume:
            raise ConfigError("checkpoint.resume: empty; use auto, none or a checkpoint path")
        if self.verify not in ("full", "metadata", "none"):
            raise ConfigError(
                f"checkpoint.verify: {self.verify!r} must be one of full, metadata, none"
            )
        if self.lustre_stripe_count == 0 or self.lustre_stripe_count < -1:
            raise ConfigError(
                f"checkpoint.lustre_stripe_count: {self.lustre_stripe_count} must be >= 1 or -1"
            )
        size = self.lustre_stripe_size
        if not (size[:-1].isdigit() if size[-1:] in "kKmMgG" else size.isdigit()):
            raise ConfigError(
                f"checkpoint.lustre_stripe_size: {size!r} must be a byte count like 4M or 16M"
            )
