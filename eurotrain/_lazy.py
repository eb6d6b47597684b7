"""Lazy re-exports: a package's public names resolve to their module on first use.

``import eurotrain`` (and ``eurotrain --help``, and importing ``eurotrain.kernels`` alone) then
costs nothing beyond torch itself: the parallel stack, DCP and their compilers load only when a
name that needs them is touched.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``exports[name]`` (a module path) on first access."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__
