"""File-system facts and primitives for checkpoints: which file system, Lustre striping,
durability (fsync of files and directories), streamed checksums, safe permissions."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import shutil
import stat
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eurotrain.checkpoint import byte_writer
from eurotrain.checkpoint.byte_writer import PIECE_DIGEST
from eurotrain.errors import CheckpointError

DIR_MODE = 0o750
FILE_MODE = 0o640
"""Checkpoints are readable by the project group, writable by the owner only, never by all."""

# statfs f_type magic numbers (linux/magic.h and the vendors' headers) for the fallback.
_FS_MAGIC = {
    0x0BD00BD0: "lustre",
    0x47504653: "gpfs",
    0x6969: "nfs",
    0xEF53: "ext4",
    0x58465342: "xfs",
    0x01021994: "tmpfs",
    0x9123683E: "btrfs",
    0x794C7630: "overlay",
    0x65735546: "fuse",
    0x00C36400: "ceph",
    0x6B414653: "beegfs",
}
PARALLEL_FS = {"lustre", "gpfs", "ceph", "cephfs", "beegfs", "wekafs", "nfs", "nfs4"}
"""File systems every node of a job sees (checkpoints belong there)."""


@dataclass(frozen=True)
class FsInfo:
    fstype: str
    mount_point: str
    source: str
    """How the type was found: "mounts" (/proc/mounts) or "statfs" (magic number)."""

    @property
    def parallel(self) -> bool:
        return self.fstype in PARALLEL_FS

    def describe(self) -> str:
        kind = "parallel" if self.parallel else "local"
        return f"{self.fstype} ({kind}, mounted at {self.mount_point}, from {self.source})"


def _unescape(field: str) -> str:
    # /proc/mounts escapes spaces, tabs, newlines and backslashes as octal.
    return field.encode().decode("unicode_escape") if "\\" in field else field


def detect_fs(path: str | Path, mounts_file: str = "/proc/mounts") -> FsInfo:
    """The file system holding ``path``: longest mount-point prefix in /proc/mounts, with
    statfs's magic number as a fallback where /proc/mounts is missing or unreadable."""
    target = Path(os.path.realpath(path))  # follows symlinks; fine for paths not yet made
    best: tuple[int, str, str] | None = None
    try:
        lines = Path(mounts_file).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt, fstype = _unescape(parts[1]), parts[2]
        inside = target == Path(mnt) or Path(mnt) in target.parents
        if inside and (best is None or len(mnt) > best[0]):
            best = (len(mnt), mnt, fstype)
    if best is not None:
        fstype = best[2]
        if fstype.startswith("fuse.") and "gpfs" in fstype:
            fstype = "gpfs"
        return FsInfo(fstype, best[1], "mounts")
    while not target.exists() and target != target.parent:
        target = target.parent
    return FsInfo(_statfs_type(target), "?", "statfs")


def _statfs_type(path: Path) -> str:
    """f_type via libc statfs(2); struct statfs starts with the f_type word on Linux."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return "unknown"
    libc = ctypes.CDLL(libc_name, use_errno=True)
    buf = ctypes.create_string_buffer(256)
    if libc.statfs(str(path).encode(), buf) != 0:
        return "unknown"
    magic = int.from_bytes(buf.raw[:8], "little") & 0xFFFFFFFF
    return _FS_MAGIC.get(magic, f"unknown(0x{magic:x})")


def lustre_setstripe(directory: Path, count: int, size: str) -> str:
    """Set the default striping of ``directory`` (new files inherit it); returns what was done."""
    lfs = shutil.which("lfs")
    if lfs is None:
        return "lustre without the lfs command: default striping kept"
    cmd = [lfs, "setstripe", "-c", str(count), "-S", size, str(directory)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"'{' '.join(cmd)}' failed ({done.stderr.strip()}): default striping kept"
    return f"striped -c {count} -S {size}"


def make_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(path, DIR_MODE)  # mkdir's mode is filtered by the umask; make it exact


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    """Write a small file, fsync it, set its mode; the caller fsyncs the directory."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, FILE_MODE)


DIGEST = PIECE_DIGEST
"""The checksum new commit markers record: SHA-256 over 32 MiB pieces, several hashed at once
(byte_writer.PIECE_DIGEST). Plain SHA-256 runs at ~1.5-1.8 GB/s on one core with the CPU's SHA
instructions (x86 SHA-NI since AMD Zen and Intel Ice Lake: the EPYC and Xeon hosts of the
EuroHPC GPU partitions; Arm's SHA2 extension), which a parallel file system outruns; the pieces
spread it over cores. Markers written before with whole-file SHA-256 (2026-11-24 to -25) or
blake2b (16-byte digests, before) stay readable."""
DIGESTS = (PIECE_DIGEST, "sha256", "blake2b")
"""Marker keys of the checksums eurotrain reads, newest first."""


def entry_digest(entry: dict[str, Any]) -> tuple[str, str]:
    """(algorithm, hex digest) of a commit marker's file entry (checked by read_marker)."""
    for algorithm in DIGESTS:
        if isinstance(entry.get(algorithm), str):
            return algorithm, entry[algorithm]
    raise KeyError(f"no checksum among {DIGESTS}")


def _whole_file_hash(algorithm: str) -> Any:
    if algorithm == "blake2b":
        return hashlib.blake2b(digest_size=16)
    assert algorithm == "sha256", algorithm
    return hashlib.sha256()


_READ = 8 << 20
"""Bytes read and hashed at a time: small enough to be hashed while still in the CPU's cache."""


def _checksum_pieces(path: Path, threads: int) -> str:
    """PIECE_DIGEST of a file, its pieces read (pread) and hashed by ``threads`` threads
    (hash_threads() when 0)."""
    size = path.stat().st_size
    piece = byte_writer.PIECE
    local = threading.local()  # each thread's read buffer

    def piece_digest(index: int) -> bytes:
        if not hasattr(local, "view"):  # read in cache-sized parts
            local.view = memoryview(bytearray(min(_READ, piece, size)))
        view, h = local.view, hashlib.sha256()
        at, end = index * piece, min((index + 1) * piece, size)
        while at < end and (n := os.preadv(fd, [view[: end - at]], at)):
            h.update(view[:n])  # n == 0: cut short meanwhile, the checksum then differs
            at += n
        return h.digest()

    fd = os.open(path, os.O_RDONLY)
    try:
        return byte_writer.digest_pieces(-(-size // piece), piece_digest, threads)
    finally:
        os.close(fd)


def checksum(path: str | Path, algorithm: str = DIGEST, threads: int = 0) -> str:
    """Checksum of a file as commit markers record it, read from disk. PIECE_DIGEST: with
    ``threads`` threads (hash_threads() when 0); the older whole-file algorithms: streamed by
    one."""
    path = Path(path)
    if algorithm == PIECE_DIGEST:
        return _checksum_pieces(path, threads)
    h = _whole_file_hash(algorithm)
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_READ)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return str(h.hexdigest())


def digest(data: bytes, algorithm: str = DIGEST) -> str:
    """The same checksum as ``checksum``, of bytes in memory."""
    if algorithm == PIECE_DIGEST:
        return byte_writer.hash_pieces([memoryview(data)])
    h = _whole_file_hash(algorithm)
    h.update(data)
    return str(h.hexdigest())


MAX_SMALL_FILE = 1 << 30
"""Largest commit marker or .metadata read into memory (a 1,000-rank run's are a few MB)."""


def link_error(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: a symbolic link, where eurotrain writes a regular file (the checkpoint may "
        f"be crafted); copy the checkpoint with the links resolved"
    )


def open_regular(path: Path) -> int:
    """A read-only descriptor of ``path``, which must be a regular file itself: not a symbolic
    link (to a file outside the checkpoint), not a FIFO (a read would never end), not a
    device. CheckpointError naming the path otherwise (FileNotFoundError where it is missing);
    eurotrain writes regular files only."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise link_error(path) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file (the checkpoint may be crafted)")
    return fd


def read_small(path: Path, limit: int = MAX_SMALL_FILE) -> bytes:
    """The bytes of a regular file (see open_regular) of at most ``limit`` bytes."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CheckpointError(f"{path}: {size} bytes, more than the {limit} it may hold")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)
