"""Raw text for the foundation loader: the embedded demo corpus, or local text files."""

from __future__ import annotations

import glob
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

from eurotrain.configtools import ConfigError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text")
"""Plain-text files (here and in ``eurotrain data prepare``)."""
CORPUS_SUFFIXES = (*TEXT_SUFFIXES, ".json", ".jsonl")
"""Files a raw-text corpus directory contributes, each read whole as one document."""


def demo_documents(num_bytes: int) -> Iterator[str]:
    """Python's standard-library sources in sorted order, up to ``num_bytes`` of text.

    Real, varied text that exists wherever Python does, so the demo needs no download."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        yield text
        total += len(text.encode("utf-8"))
        if total >= num_bytes:
            return


def expand_paths(spec: str, keep: Callable[[Path], bool]) -> list[Path]:
    """A file as given; a directory's files (recursively) and a glob's matches that ``keep``
    accepts, sorted. Empty when nothing matches: the caller says what it expected."""
    p = Path(spec)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and keep(f))
    return sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())


def file_documents(spec: str) -> Iterator[str]:
    """One document per file: a file, a directory (recursively, text suffixes) or a glob."""
    paths = expand_paths(spec, lambda f: f.suffix in CORPUS_SUFFIXES)
    if not paths:
        if Path(spec).is_dir():
            raise ConfigError(
                f"data.corpus: directory {spec!r} holds no text files ({', '.join(CORPUS_SUFFIXES)})"
            )
        raise ConfigError(
            f"data.corpus: {spec!r} is not a file, a directory, or a glob that matches "
            f"files. Give the local path of your text, or 'demo' for the built-in corpus."
        )
    for path in paths:
        yield path.read_text(encoding="utf-8", errors="replace")


def documents(corpus: str, demo_bytes: int) -> Iterator[str]:
    return demo_documents(demo_bytes) if corpus == "demo" else file_documents(corpus)
