"""Unpickling DCP's ``.metadata`` without trusting it: only what eurotrain's checkpoints hold.

DCP writes its global metadata with plain ``pickle``, and unpickling calls whatever the file
names. Restricting ``find_class`` alone is not enough: protocol 4 resolves dotted names through
attributes (``("torch.distributed.checkpoint.filesystem", "os.system")`` is ``os.system``),
extension codes (EXT1/2/4) skip ``find_class`` once copyreg's cache holds them, and REDUCE,
NEWOBJ and BUILD call or change whatever is on the stack. So the file is run on Python's own
pickle machine (``pickle._Unpickler``) with every opcode that calls or changes an object checked:

- a global is one of the (module, name) pairs of ``_GLOBALS``, answered from that table: never
  imported, never looked up by attribute, never a dotted name;
- REDUCE calls torch.Size, torch.serialization._get_layout, DCP's memory-format enum or
  PosixPath only, each with the argument types it is pickled with, and ``getattr`` with that
  enum and the name of one of its members only (how early Python 3.11 releases, such as
  Debian 12's 3.11.2, pickle an enum member; other releases call the enum with its value);
- NEWOBJ creates DCP's metadata dataclasses only, without arguments;
- BUILD sets declared dataclass fields of such an instance (TensorProperties: its own
  __setstate__ with a 5-tuple); APPEND(S) acts on lists only, SETITEM(S) and DICT on dicts only;
- a dict key is a str, an int, None, a torch.Size or a MetadataIndex whose fields have those
  types: hashing anything else could run without bound (a tuple nested a million deep
  overflows the C stack while it is hashed: a crash, not an exception), and nothing is hashed
  before it is checked (REDUCE's and NEWOBJ's callables are found by identity);
- INST, OBJ, NEWOBJ_EX, EXT1/2/4, PERSID/BINPERSID, sets (EMPTY_SET, ADDITEMS, FROZENSET)
  and out-of-band buffers are refused.

The list was taken from the GLOBAL/STACK_GLOBAL, REDUCE, NEWOBJ and BUILD opcodes of the
metadata of real checkpoints (one process, FSDP, HSDP, TP, TP x FSDP, pipeline; torch 2.13,
protocol 4). A torch release that pickles more will be refused with the name to add here.
"""

from __future__ import annotations

import copyreg
import dataclasses
import enum
import io
import pathlib
import pickle
import pickletools
import reprlib
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch.distributed.checkpoint import filesystem as dcp_fs
from torch.distributed.checkpoint import metadata as dcp_meta

_META = "torch.distributed.checkpoint.metadata"
_DATACLASSES = {
    (_META, "Metadata"): dcp_meta.Metadata,
    (_META, "MetadataIndex"): dcp_meta.MetadataIndex,
    (_META, "TensorStorageMetadata"): dcp_meta.TensorStorageMetadata,
    (_META, "BytesStorageMetadata"): dcp_meta.BytesStorageMetadata,
    (_META, "ChunkStorageMetadata"): dcp_meta.ChunkStorageMetadata,
    (_META, "TensorProperties"): dcp_meta.TensorProperties,
    (_META, "StorageMeta"): dcp_meta.StorageMeta,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp_fs._StorageInfo,
}
_MEM_FORMAT: type[enum.Enum] = dcp_meta._MEM_FORMAT_ENCODING  # type: ignore[attr-defined]
_DTYPE_NAMES = (
    "float64", "float32", "float16", "bfloat16", "complex64", "complex128", "int64", "int32",
    "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool", "float8_e4m3fn",
    "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
)  # fmt: skip


def _is_ints(args: tuple) -> bool:
    return len(args) == 1 and type(args[0]) is tuple and all(type(i) is int for i in args[0])


def _is_one(kind: type) -> Callable[[tuple], bool]:
    return lambda args: len(args) == 1 and type(args[0]) is kind


def _is_member(args: tuple) -> bool:
    """getattr(enum, name) where name is one of the enum's members (not any attribute)."""
    return (
        len(args) == 2
        and args[0] is _MEM_FORMAT
        and type(args[1]) is str
        and args[1] in _MEM_FORMAT.__members__
    )


# What REDUCE may call, with a check of the arguments it is called with.
_CALLS: dict[Any, Callable[[tuple], bool]] = {
    torch.Size: _is_ints,
    getattr: _is_member,
    torch.serialization._get_layout: _is_one(str),
    _MEM_FORMAT: _is_one(int),
    pathlib.PosixPath: lambda args: all(type(a) is str for a in args),
}
_GLOBALS: dict[tuple[str, str], Any] = {
    **_DATACLASSES,
    (_META, "_MEM_FORMAT_ENCODING"): _MEM_FORMAT,
    ("torch", "Size"): torch.Size,
    ("builtins", "getattr"): getattr,
    ("__builtin__", "getattr"): getattr,  # the same in protocol 2 (Python 2's module name)
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib._local", "PosixPath"): pathlib.PosixPath,  # how Python >= 3.13 pickles it
    **{("torch", n): getattr(torch, n) for n in _DTYPE_NAMES if hasattr(torch, n)},
}
# What BUILD may set on an instance of each class: its dataclass fields, by name.
_FIELDS = {
    cls: frozenset(f.name for f in dataclasses.fields(cls))
    for cls in _DATACLASSES.values()
    if cls is not dcp_meta.TensorProperties
}
_NEWOBJ = {cls: cls for cls in _DATACLASSES.values()}
_REFUSED_OPS = (
    "INST", "OBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID", "NEXT_BUFFER",
    "READONLY_BUFFER", "EMPTY_SET", "ADDITEMS", "FROZENSET",
)  # fmt: skip
_KEYS = (str, int, type(None), torch.Size)
"""Types a dict key of the metadata may have (besides a checked MetadataIndex)."""


class Refused(pickle.UnpicklingError):
    """The pickle asks for something a checkpoint's metadata never holds."""


def _describe(obj: Any) -> str:
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{getattr(obj, '__module__', None) or type(obj).__module__}.{name}"


class RestrictedUnpickler(pickle._Unpickler):
    """Python's pickle machine with every calling or mutating opcode checked (see above)."""

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)
    stack: list[Any]  # the machine's own state, set by load()
    pop_mark: Callable[[], list[Any]]
    read: Callable[[int], bytes]
    append: Callable[[Any], None]
    readline: Callable[[], bytes]

    def find_class(self, module: str, name: str) -> Any:
        if "." in name:
            raise Refused(f"refers to the global {name!r} of {module} (a dotted name)")
        found = _GLOBALS.get((module, name))
        if found is None:
            raise Refused(f"refers to the global {module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise Refused(f"holds a persistent id ({pid!r})")

    def _reduce(self) -> None:
        stack = self.stack
        args, func = stack.pop(), stack[-1]
        check = _lookup(_CALLS, func)
        if check is None or type(args) is not tuple:
            raise Refused(f"calls {_describe(func)} (REDUCE)")
        if not check(args):
            raise Refused(f"calls {_describe(func)} with arguments {reprlib.repr(args)}")
        stack[-1] = func(*args)

    def _newobj(self) -> None:
        stack = self.stack
        args, cls = stack.pop(), stack.pop()
        if _lookup(_NEWOBJ, cls) is None or type(args) is not tuple or args:
            raise Refused(f"creates {_describe(cls)} (NEWOBJ)")
        stack.append(cls.__new__(cls))

    def _build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]
        cls = type(inst)
        if cls is dcp_meta.TensorProperties and type(state) is tuple and len(state) == 5:
            self.stack.pop()
            inst.__setstate__(state)  # which checks the memory-format code itself
            return
        fields = _FIELDS.get(cls)
        if fields is None or type(state) is not dict:
            what = f"the class {_describe(inst)}" if isinstance(inst, type) else _describe(cls)
            raise Refused(f"sets the state of {what} (BUILD)")
        odd = [k for k in state if type(k) is not str or k not in fields]
        if odd:
            raise Refused(f"sets {odd[0]!r:.60} on {_describe(cls)}, not one of its fields")
        self.stack.pop()
        inst.__dict__.update(state)

    def _target(self, kind: type, op: str) -> Any:
        target = self.stack[-1]
        if type(target) is not kind:
            raise Refused(f"applies {op} to a {_describe(type(target))}")
        return target

    def _append(self) -> None:
        value = self.stack.pop()
        self._target(list, "APPEND").append(value)

    def _appends(self) -> None:
        items = self.pop_mark()
        self._target(list, "APPENDS").extend(items)

    def _setitem(self) -> None:
        value, key = self.stack.pop(), self.stack.pop()
        self._target(dict, "SETITEM")[_key(key)] = value

    def _setitems(self) -> None:
        items = self.pop_mark()
        target = self._target(dict, "SETITEMS")
        for i in range(0, len(items), 2):
            target[_key(items[i])] = items[i + 1]

    def _dict(self) -> None:
        items = self.pop_mark()
        self.append({_key(items[i]): items[i + 1] for i in range(0, len(items), 2)})


def _key(key: Any) -> Any:
    """``key`` where it is one of the kinds the metadata's dicts use (see above)."""
    if type(key) in _KEYS:
        return key
    if type(key) is dcp_meta.MetadataIndex:
        fields = vars(key)
        if (
            type(fields.get("fqn")) is str
            and type(fields.get("offset")) in (torch.Size, type(None))
            and type(fields.get("index")) in (int, type(None))
        ):
            return key
    raise Refused(f"uses a {_describe(type(key))} as a dict key")


def _lookup(table: dict[Any, Any], obj: Any) -> Any:
    """The value of the key that is ``obj`` itself, or None: found by identity, so that
    nothing from the file is hashed."""
    return next((value for key, value in table.items() if key is obj), None)


def _refuse_inst(self: RestrictedUnpickler) -> None:
    module = self.readline()[:-1].decode("utf-8", "replace")
    name = self.readline()[:-1].decode("utf-8", "replace")
    raise Refused(f"creates {module}.{name} with the opcode INST")


def _refuse_ext(size: int) -> Callable[[RestrictedUnpickler], None]:
    def refuse(self: RestrictedUnpickler) -> None:
        code = int.from_bytes(self.read(size), "little")
        target = copyreg._inverted_registry.get(code)  # type: ignore[attr-defined]
        known = f", registered for {'.'.join(target)}" if target else ""
        raise Refused(f"uses the extension code {code} (EXT{size}{known})")

    return refuse


def _install() -> None:
    table = RestrictedUnpickler.dispatch
    ops: dict[str, Callable[[RestrictedUnpickler], None]] = {
        "REDUCE": RestrictedUnpickler._reduce,
        "NEWOBJ": RestrictedUnpickler._newobj,
        "BUILD": RestrictedUnpickler._build,
        "APPEND": RestrictedUnpickler._append,
        "APPENDS": RestrictedUnpickler._appends,
        "SETITEM": RestrictedUnpickler._setitem,
        "SETITEMS": RestrictedUnpickler._setitems,
        "DICT": RestrictedUnpickler._dict,
        "INST": _refuse_inst,
        "EXT1": _refuse_ext(1),
        "EXT2": _refuse_ext(2),
        "EXT4": _refuse_ext(4),
    }
    for name in _REFUSED_OPS:
        ops.setdefault(name, _refuse_op(name))
    for name, handler in ops.items():
        table[getattr(pickle, name)[0]] = handler


def _refuse_op(name: str) -> Callable[[RestrictedUnpickler], None]:
    def refuse(self: RestrictedUnpickler) -> None:
        raise Refused(f"uses the opcode {name}")

    return refuse


_install()


def unpickle_metadata(data: bytes) -> dcp_meta.Metadata:
    """The DCP Metadata in ``data``; Refused for anything outside the lists above, other
    exceptions (UnpicklingError, EOFError, KeyError for an unknown opcode...) for garbage."""
    obj = RestrictedUnpickler(io.BytesIO(data)).load()
    if type(obj) is not dcp_meta.Metadata:
        raise Refused(f"holds a {_describe(type(obj))} instead of DCP Metadata")
    return obj


MAX_NESTING = 100
"""Deepest nesting of containers a checked value may have (eurotrain's are a few deep)."""
_KEEPS = frozenset(("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"))
_GETS = frozenset(("GET", "BINGET", "LONG_BINGET"))
_MUTATES = frozenset(("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"))


def nesting(data: bytes, limit: int = MAX_NESTING) -> int:
    """How deeply the objects a pickle builds are nested, from its opcodes alone (nothing is
    built); Refused as soon as it passes ``limit``, and for a malformed pickle.

    What this guards: torch.load(weights_only=True) hashes what a pickle makes a dict key, and
    Python hashes a tuple by recursing in C without a depth check, so a tuple nested a million
    deep (a few MB of pickle) kills the process with a stack overflow instead of raising. Each
    object gets 1 + the deepest of what the opcode that made it consumed (a container changed
    later keeps the depth it had when it was stored, which can only matter for mutable ones,
    whose hashing fails at once); a tuple, being immutable, is always exact.
    """
    stack: list[int] = []
    marks: list[int] = []
    memo: dict[Any, int] = {}
    deepest = 0
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name == "MARK":
                marks.append(len(stack))
                continue
            if name in _KEEPS:
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
                continue
            if name in _GETS:
                stack.append(memo[arg])
                continue
            # What the opcode takes: the items above the last mark, if it takes a mark, and
            # the ones its stack_before names below it (the target of APPEND(S), SETITEM(S),
            # ADDITEMS and BUILD first among those).
            before = op.stack_before
            above: list[int] = []
            below = len(before)
            if pickletools.markobject in before:
                start = marks.pop()
                above, stack[start:] = stack[start:], []
                below = before.index(pickletools.markobject)
            if len(stack) < below:
                raise Refused(f"pops an empty stack at the opcode {name}")
            under, stack[len(stack) - below :] = stack[len(stack) - below :], []
            if name == "DUP":
                stack += under * 2
                continue
            if name in _MUTATES:  # the target stays; what goes into it may deepen it
                target, *rest = under
                depth = max(target, 1 + max(rest + above, default=0))
            elif not op.stack_after:  # POP, STOP...
                continue
            else:
                taken = under + above
                depth = 1 + max(taken, default=0) if taken or "EMPTY" in name else 0
            if depth > limit:
                raise Refused(f"nests objects more than {limit} deep (opcode {name})")
            deepest = max(deepest, depth)
            stack += [depth] * len(op.stack_after)
    except (ValueError, IndexError, KeyError) as e:
        raise Refused(f"is not a well-formed pickle ({type(e).__name__}: {e})") from None
    return deepest
