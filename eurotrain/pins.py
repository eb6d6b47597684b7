"""The pinned versions that are torch's to choose: a GPU build of torch pins its own triton.

torch 2.13.0's CUDA wheel requires ``triton==3.7.1``, its ROCm wheels ``pytorch-triton-rocm``
(which installs the same ``triton`` module); the CPU wheel requires no triton. The pinned set
(requirements-pinned.txt) names ``triton==3.9.0`` for the CPU machines' Triton interpreter;
installed over a GPU torch it would leave ``torch.compile`` with a Triton the torch was not built
against (and, beside pytorch-triton-rocm, two distributions writing one module). So a pin is left
out where torch pins that distribution itself, and ``triton`` where torch pins any Triton.

Standard library only: the Makefile runs this file before anything else is installed,

    python eurotrain/pins.py requirements-pinned.txt > PINS

and ``eurotrain bundle`` applies the same rule to the torch wheel it downloads.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from importlib import metadata

_EXACT = re.compile(r"\s*([A-Za-z0-9._-]+)\s*(\[[^\]]*\])?\s*===?\s*([^\s;,]+)")


def normal(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pin(requirement: str) -> tuple[str, str] | None:
    """(name as written, version) of a requirement pinned with ==, else None; extras and
    markers are dropped (a pin torch makes on some platform is torch's to make)."""
    m = _EXACT.match(requirement)
    return None if m is None else (m[1], m[3])


def left_to_torch(torch_requires: Iterable[str]) -> dict[str, str]:
    """The pins to leave out (normalized names), each with what torch asks for instead."""
    pins = [p for r in torch_requires if (p := pin(r)) is not None]
    own = {normal(name): f"{normal(name)}=={version}" for name, version in pins}
    tritons = [req for name, req in own.items() if "triton" in name]
    if tritons and "triton" not in own:
        own["triton"] = tritons[0]
    return own


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python eurotrain/pins.py REQUIREMENTS > FILE", file=sys.stderr)
        return 2
    try:
        requires = metadata.requires("torch") or []
        torch = f"torch {metadata.version('torch')}"
    except metadata.PackageNotFoundError:
        requires, torch = [], "torch"
    drop = left_to_torch(requires)
    with open(argv[1], encoding="utf-8") as f:
        for line in f:
            p = pin(line)
            if p is not None and normal(p[0]) in drop:
                print(f"pins: {line.strip()} left out: the installed {torch} requires "
                      f"{drop[normal(p[0])]}", file=sys.stderr)  # fmt: skip
                continue
            sys.stdout.write(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
