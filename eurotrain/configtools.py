"""Typed dataclass configs: build from nested dicts, apply dotted overrides, explain errors.

Everything here is generic; the config tree itself lives in ``eurotrain/config.py`` and in the
components it configures. Errors are ``ConfigError`` (a ``ValueError``) whose message names the
field, the bad value and what is allowed, so a wrong setting stops a job before it asks for GPUs.
Config files are read as if from a stranger: YAML that would exhaust memory or the stack, or
silently drop a setting (a key given twice), is refused at the load (``eurotrain/safe_yaml.py``),
and nan or inf is refused for every float setting."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, cast, get_args, get_origin

import yaml

from eurotrain import resources
from eurotrain.errors import ConfigError, shown
from eurotrain.safe_yaml import load_yaml

__all__ = [
    "ConfigError",
    "from_dict",
    "load_yaml",
    "merge",
    "parse_overrides",
    "read_yaml",
    "shown",
    "to_dict",
]

T = TypeVar("T")

INT64 = 2**63
"""Config integers lie in [-INT64, INT64): the range of the int64 that torch and numpy hold."""


class _OutOfRange(ConfigError):
    """A number of the right type but an impossible size (nan, inf, beyond int64): reported as
    is instead of as "not a float | null" when the annotation is a union."""


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n``, ascending (for "choose one of" suggestions)."""
    return [d for d in range(1, n + 1) if n % d == 0]


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where it is lossless."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            near = []
            if isinstance(value, str):
                near = difflib.get_close_matches(value, [str(a) for a in allowed], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(
                f"{where}: {shown(value)} is not allowed; choose one of "
                f"{', '.join(repr(a) for a in allowed)}{hint}"
            )
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except _OutOfRange:
                raise
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {shown(value)} is not a {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        cls = cast(type, tp)  # an annotation: a dataclass type, never an instance
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ConfigError(
                f"{where}: expected a mapping of {cls.__name__} fields, got {shown(value)}"
            )
        return from_dict(cls, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {shown(value)}")
        (item_tp,) = get_args(tp)[:1] or (Any,)
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {shown(value)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {shown(value)}")
    if tp is int:
        return _integer(value, where)
    if tp is float:
        return _finite(value, where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {shown(value)}")
    return value


def _integer(value: Any, where: str) -> int:
    number = value
    if isinstance(value, float) and value.is_integer():
        number = int(value)
    if not isinstance(number, int) or isinstance(number, bool):
        raise ConfigError(f"{where}: expected an integer, got {shown(value)}")
    if not -INT64 <= number < INT64:
        raise _OutOfRange(
            f"{where}: {shown(value)} is out of range; a config integer lies between -2**63 "
            f"and 2**63 - 1"
        )
    return number


def _finite(value: Any, where: str) -> float:
    """A float from a number, or a string YAML did not read as one (3e-4 has no dot); nan and
    inf are refused for every field: each passes checks such as ``x <= 0`` and then trains
    silently wrong (an inf norm_eps zeroes every gradient, a nan grad_clip turns clipping off)."""
    number = None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond the largest float
            raise _OutOfRange(
                f"{where}: {shown(value)} is beyond the largest float (about 1.8e308); write "
                f"a realistic value"
            ) from None
        except ValueError:
            pass
    if number is None:
        raise ConfigError(f"{where}: expected a number, got {shown(value)}")
    if not math.isfinite(number):
        raise _OutOfRange(
            f"{where}: {shown(value)} is not a finite number; write a finite value (nan and "
            f"inf are refused for every setting)"
        )
    return number


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys by name."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cast(Any, cls)) if f.init]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            name = key if isinstance(key, str) else shown(key)
            near = difflib.get_close_matches(name[:100], names, n=1, cutoff=0.5)
            hint = f"did you mean {(where + '.' if where else '') + near[0]!r}? " if near else ""
            raise ConfigError(
                f"unknown config key {shown(f'{where}.{name}' if where else name)}: {hint}valid "
                f"keys{' of ' + where if where else ''} are: {', '.join(names)}"
            )
        path = f"{where}.{key}" if where else key
        kwargs[key] = _convert(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if where and not str(e).startswith(where):
            raise ConfigError(f"{where}.{e}") from None
        raise


def to_dict(cfg: Any) -> dict[str, Any]:
    """The plain-data form of a config tree (for YAML, JSON and checkpoints)."""
    return dataclasses.asdict(cfg)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ``--optim.lr 3e-4 --train.steps=10`` into a nested dict of YAML-parsed values."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(
                f"unexpected argument {arg!r}: overrides look like --section.key value "
                f"(for example --optim.lr 3e-4)"
            )
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg!r} has no value: write {arg} VALUE")
            i += 1
            raw = args[i]
        i += 1
        if "." not in key:
            raise ConfigError(
                f"override --{key} names no section: write --SECTION.{key} VALUE "
                f"(for example --train.{key})"
            )
        try:
            value = load_yaml(raw, f"override --{key}") if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key} conflicts with another override")
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``extra`` into a copy of ``base`` (mappings merge, other values replace)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config file into a dict, with an error that names the file and the fix.

    ``base: other.yaml`` (relative to the file) starts from another file; ``_chain`` holds the
    files that led here, so files that include each other are named instead of recursing."""
    p = resources.config_file(path)
    via = f" (named by 'base:' in {str(_chain[-1])!r})" if _chain else ""
    if p.is_dir():
        inside = sorted(c.name for c in p.iterdir() if c.suffix in (".yaml", ".yml"))
        hint = f" Did you mean {str(p / inside[0])!r}?" if inside else ""
        raise ConfigError(
            f"config file {str(p)!r}{via} is a directory, not a YAML file.{hint} Pass the path "
            f"of a YAML config, for example configs/tiny.yaml."
        )
    if not p.is_file():
        hint = ""
        if p.parent.is_dir():
            near = difflib.get_close_matches(p.name, [c.name for c in p.parent.iterdir()], n=1)
            if near:
                hint = f" Did you mean {str(p.parent / near[0])!r}?"
        presets = list(resources.presets())
        if not hint and len(p.parts) == 1:
            near = difflib.get_close_matches(p.name.removesuffix(".yaml"), presets, n=1)
            hint = f" Did you mean the preset {near[0]!r}?" if near else ""
        raise ConfigError(
            f"config file {str(p)!r}{via} does not exist.{hint} Pass the path of a YAML config "
            f"or the name of a preset (presets: {', '.join(presets)})."
        )
    try:
        data = load_yaml(p.read_bytes().decode("utf-8"), f"config file {str(p)!r}")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {str(p)!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
            f"offset {e.start}); save it as UTF-8"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"config file {str(p)!r} is not valid YAML{at}: {getattr(e, 'problem', e)}. "
            f"Fix the syntax there (indent with spaces, 'key: value' pairs)."
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(p)!r} must hold a mapping of sections (model:, train:, ...), "
            f"not a {type(data).__name__}"
        )
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(
            f"config file {str(p)!r}: 'base:' must be the path of another YAML file (relative "
            f"to this one), not {shown(base)}"
        )
    chain = (*_chain, p)
    target = _base_file(p, base)
    seen = [c.resolve() for c in chain]
    if target.resolve() in seen:
        cycle = [*chain[seen.index(target.resolve()) :], target]
        if len(cycle) == 2:
            raise ConfigError(
                f"config file {str(p)!r} includes itself through 'base: {base}'; remove that line"
            )
        raise ConfigError(
            f"config files include each other through 'base:': "
            f"{' -> '.join(str(c) for c in cycle)}; remove one of these 'base:' lines"
        )
    return merge(read_yaml(target, chain), data)


def _base_file(config: Path, base: str) -> Path:
    """The file ``base: NAME`` in `config` names: relative to `config`, or a preset when no
    such file is there ('base: tiny')."""
    target = config.parent / base
    if not target.exists():
        target = resources.preset_file(base) or target
    return target


def config_chain(path: str | Path) -> list[Path]:
    """The config file `path` names, then each file its ``base:`` lines include, in order
    (for what must be visible to the ranks; read_yaml reports any problem with them)."""
    chain = [resources.config_file(path)]
    while chain[-1].is_file():
        try:
            data = load_yaml(chain[-1].read_bytes().decode("utf-8"), str(chain[-1]))
        except (UnicodeDecodeError, yaml.YAMLError, ConfigError):
            break
        base = data.get("base") if isinstance(data, dict) else None
        if not isinstance(base, str) or not base:
            break
        target = _base_file(chain[-1], base)
        if target.resolve() in {c.resolve() for c in chain}:
            break
        chain.append(target)
    return chain
