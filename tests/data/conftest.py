"""Fixtures for the data tests: a corpus, a BPE tokenizer and prepared directories (real files,
real `datasets` processing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .corpora import make_documents, train_bpe, write_text_files


@pytest.fixture(scope="session")
def docs() -> list[str]:
    return make_documents(120)


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory, docs) -> Path:
    return train_bpe(tmp_path_factory.mktemp("bpe"), docs)


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory, docs) -> Path:
    return write_text_files(tmp_path_factory.mktemp("corpus"), docs)


@pytest.fixture(scope="session")
def prepared_byte(tmp_path_factory, text_dir) -> Path:
    """The corpus prepared with the byte tokenizer, in several shards."""
    from eurotrain.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "byte"
    prepare(str(text_dir), "byte", str(out), workers=1, shard_size_mb=0.01)
    return out
