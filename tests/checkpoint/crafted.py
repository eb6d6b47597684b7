"""Crafted checkpoint files, written opcode by opcode where pickle.dumps cannot produce them.

Each payload runs ``touch MARKER`` if it is ever executed, so a test sees whether it ran.
Most are "silent": the payload's result is popped and the real metadata follows, so an
unpickler that runs it still returns valid DCP metadata and the run would carry on as usual.
"""

from __future__ import annotations

import copyreg
import io
import json
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import torch

FS = "torch.distributed.checkpoint.filesystem"  # a module the metadata legitimately names
META = "torch.distributed.checkpoint.metadata"
EXT_CODE = 0xF00D
"""A private extension code, registered only for the extension test."""


def text(s: str) -> bytes:
    b = s.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(b)]) + b


def stack_global(module: str, name: str) -> bytes:
    return text(module) + text(name) + pickle.STACK_GLOBAL


def global_(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def call(func: bytes, *args: bytes) -> bytes:
    return func + pickle.MARK + b"".join(args) + pickle.TUPLE + pickle.REDUCE


def silent(payload: bytes, real: bytes) -> bytes:
    """Protocol 4: run the payload, drop its result, then unpickle the real metadata."""
    assert real[:2] == pickle.PROTO + b"\x04"
    return pickle.PROTO + b"\x04" + payload + pickle.POP + real[2:]


def touch(marker: Path) -> str:
    return f"touch {marker}"


def evil_dumps(marker: Path, protocol: int) -> bytes:
    """What pickle.dumps itself writes for an object whose __reduce__ calls os.system."""

    class Evil:
        def __reduce__(self):
            return (os.system, (touch(marker),))

    return pickle.dumps(Evil(), protocol=protocol)


def payloads(marker: Path) -> dict[str, Callable[[bytes], bytes]]:
    """name -> (real metadata bytes -> crafted .metadata bytes)."""
    cmd = text(touch(marker))
    dotted = stack_global(FS, "os.system")
    out: dict[str, Callable[[bytes], bytes]] = {
        # The reported attack: a dotted name under a module the metadata legitimately uses.
        "dotted-stack-global": lambda r: silent(call(dotted, cmd), r),
        "dotted-global-opcode": lambda r: silent(call(global_(FS, "os.system"), cmd), r),
        "dotted-via-pathlib": lambda r: silent(call(stack_global("pathlib", "os.system"), cmd), r),
        "dotted-inst-opcode": lambda r: silent(
            pickle.MARK + cmd + pickle.INST + f"{FS}\nos.system\n".encode(), r
        ),
        "nested-reduce": lambda r: silent(
            call(stack_global("torch", "Size"), call(dotted, cmd) + pickle.TUPLE1), r
        ),
        "builtins-eval": lambda r: silent(
            call(
                stack_global("builtins", "eval"),
                text(f"__import__('os').system({touch(marker)!r})"),
            ),
            r,
        ),
        "builtins-exec": lambda r: silent(
            call(
                stack_global("builtins", "exec"), text(f"import os; os.system({touch(marker)!r})")
            ),
            r,
        ),
        "builtins-getattr": lambda r: silent(
            call(
                call(stack_global("builtins", "getattr"), stack_global(FS, "os"), text("system")),
                cmd,
            ),
            r,
        ),
        # getattr is read (early Python 3.11 pickles enum members with it), but only for a
        # member of DCP's memory-format enum.
        "getattr-beyond-members": lambda r: silent(
            call(
                call(
                    stack_global("builtins", "getattr"),
                    stack_global(META, "_MEM_FORMAT_ENCODING"),
                    text("__init_subclass__"),
                ),
                cmd,
            ),
            r,
        ),
        "posix-system": lambda r: silent(call(stack_global("posix", "system"), cmd), r),
        "subprocess-popen": lambda r: silent(
            call(
                stack_global("subprocess", "Popen"),
                pickle.MARK + text("touch") + text(str(marker)) + pickle.LIST,
            ),
            r,
        ),
        # Pickles made by pickle.dumps in every protocol (not silent: the whole file).
        **{f"protocol-{p}": (lambda r, p=p: evil_dumps(marker, p)) for p in range(6)},
        # Extension codes: resolved from copyreg's cache without find_class once anything
        # in the process unpickled them (see extension_registered).
        "extension-code": lambda r: silent(
            pickle.EXT2 + struct.pack("<H", EXT_CODE) + cmd + pickle.TUPLE1 + pickle.REDUCE, r
        ),
        "persistent-id": lambda r: silent(cmd + pickle.BINPERSID, r),
    }
    return out


# Not code execution, but changes to classes or objects beyond what the metadata holds.
def build_on_class(real: bytes) -> bytes:
    """BUILD with slot state on the Metadata *class*: setattr(Metadata, 'eurotrain_pwned', 1)."""
    state = pickle.NONE + pickle.EMPTY_DICT + text("eurotrain_pwned") + pickle.BININT1 + b"\x01"
    state += pickle.SETITEM + pickle.TUPLE2
    return silent(stack_global(META, "Metadata") + state + pickle.BUILD, real)


def build_odd_field(real: bytes) -> bytes:
    """BUILD on an allowed instance with a key that is not one of its fields."""
    obj = stack_global(META, "StorageMeta") + pickle.EMPTY_TUPLE + pickle.NEWOBJ
    state = pickle.EMPTY_DICT + text("__class__") + stack_global("torch", "Size") + pickle.SETITEM
    return silent(obj + state + pickle.BUILD, real)


def newobj_not_listed(real: bytes) -> bytes:
    """NEWOBJ on an allowed global that is no metadata class (torch.Size)."""
    return silent(stack_global("torch", "Size") + pickle.EMPTY_TUPLE + pickle.NEWOBJ, real)


class extension_registered:
    """Register EXT_CODE for posix.system and let an ordinary unpickling cache it, as any
    library that uses copyreg extensions would; undone on exit."""

    def __enter__(self) -> None:
        copyreg.add_extension("posix", "system", EXT_CODE)
        pickle.loads(pickle.PROTO + b"\x02" + pickle.EXT2 + struct.pack("<H", EXT_CODE) + b".")

    def __exit__(self, *exc: object) -> None:
        copyreg.remove_extension("posix", "system", EXT_CODE)


def piece_sha256(data: bytes, piece: int = 32 << 20) -> str:
    """The commit markers' checksum (sha256-pieces-32MiB), written out here on its own: SHA-256
    of the SHA-256 digests of the data's consecutive ``piece``-byte pieces."""
    import hashlib

    parts = [data[at : at + piece] for at in range(0, len(data), piece)]
    return hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in parts)).hexdigest()


def resign(ckpt: Path, algorithm: str = "sha256-pieces-32MiB") -> None:
    """Recompute the commit marker's sizes and checksums, as whoever sends the files can
    (``algorithm`` sha256 or blake2b: as eurotrain wrote markers before)."""
    import hashlib

    marker = json.loads((ckpt / "COMMITTED.json").read_text())
    for name, entry in marker["files"].items():
        data = (ckpt / name).read_bytes()
        entry["size"] = len(data)
        for key in ("sha256-pieces-32MiB", "sha256", "blake2b"):
            entry.pop(key, None)
        if algorithm == "blake2b":
            entry["blake2b"] = hashlib.blake2b(data, digest_size=16).hexdigest()
        elif algorithm == "sha256":
            entry["sha256"] = hashlib.sha256(data).hexdigest()
        else:
            assert algorithm == "sha256-pieces-32MiB", algorithm
            entry[algorithm] = piece_sha256(data)
    (ckpt / "COMMITTED.json").write_text(json.dumps(marker))


def replace_value(ckpt: Path, key: str, blob: bytes) -> None:
    """Point the non-tensor entry ``key`` (e.g. "train") at ``blob``, appended to a data
    file, and rewrite .metadata accordingly (a legitimate pickle: only the data is crafted)."""
    meta = pickle.loads((ckpt / ".metadata").read_bytes())  # our own file: trusted here
    index = next(i for i in meta.storage_data if i.fqn == key)
    info = meta.storage_data[index]
    shard = ckpt / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(blob)
    info.offset, info.length = offset, len(blob)
    (ckpt / ".metadata").write_bytes(pickle.dumps(meta, protocol=4))


def torch_saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def zero_first_tensor(ckpt: Path, file: str) -> None:
    """Overwrite the header of the first tensor in a data file with zeros (same size): only
    reading it reveals the damage."""
    meta = pickle.loads((ckpt / ".metadata").read_bytes())  # our own file: trusted here
    offset = min(
        info.offset
        for index, info in meta.storage_data.items()
        if info.relative_path == file and index.fqn.startswith("model.")
    )
    with open(ckpt / file, "r+b") as f:
        f.seek(offset)
        f.write(bytes(64))
