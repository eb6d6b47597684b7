"""The loader over prepared shards: exact epochs across ranks, exact resume under another
number of ranks, blend proportions, and document positions."""

from __future__ import annotations

import numpy as np
import pytest

from eurotrain.configtools import ConfigError
from eurotrain.data import GlobalBatchLoader, PackedSequences, PreparedDataset, PreparedSequences
from eurotrain.data.prepare import prepare
from eurotrain.errors import CheckpointError

from .corpora import make_documents, write_text_files

SEQ = 32
GLOBAL = 16


def loaders(source, dp_size: int, seed: int = 3, **kw) -> list[GlobalBatchLoader]:
    return [GlobalBatchLoader(source, GLOBAL, 2, r, dp_size, seed, **kw) for r in range(dp_size)]


def global_batch(ranks: list[GlobalBatchLoader]) -> np.ndarray:
    """One step of every rank, concatenated in rank order: the global batch as rows."""
    return np.concatenate([torch_rows(next(r)) for r in ranks])


def torch_rows(batch) -> np.ndarray:
    x = np.concatenate([t.numpy() for t in batch.inputs])
    y = np.concatenate([t.numpy() for t in batch.labels])
    assert (x[:, 1:] == y[:, :-1]).all(), "labels are the inputs shifted by one"
    return np.concatenate([x, y[:, -1:]], axis=1)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> PreparedSequences:
    """Documents of consecutive numbers ("1000 1001 ..."): every row's tokens are distinct, so
    a served row tells which row it is. Several shards, so some rows span two."""
    root = tmp_path_factory.mktemp("counting")
    docs = [" ".join(str(k) for k in range(1000 + 300 * d, 1300 + 300 * d)) for d in range(24)]
    prepare(str(write_text_files(root / "in", docs)), "byte", str(root / "out"),
            shard_size_mb=0.01)  # fmt: skip
    return PreparedSequences(PreparedDataset(root / "out"), SEQ)


def test_rows_are_the_token_stream(source):
    ds = source.dataset
    stream = ds.read_rows(np.array([0]), ds.num_tokens)[0]
    idx = np.arange(len(source))
    expected = stream[idx[:, None] * SEQ + np.arange(SEQ + 1)]
    assert (source.gather(idx) == expected).all()  # including rows that span two shards
    assert len(source) == (ds.num_tokens - 1) // SEQ


def test_one_epoch_over_four_ranks_serves_every_sequence_once(source):
    n = len(source)
    all_rows = {source.gather(np.array([i]))[0].astype(np.int64).tobytes(): i for i in range(n)}
    assert len(all_rows) == n, "the test corpus must have distinct rows"
    ranks = loaders(source, 4)
    served = np.concatenate([global_batch(ranks) for _ in range(-(-n // GLOBAL))])
    ids = [all_rows[r.tobytes()] for r in served]
    assert sorted(ids[:n]) == list(range(n)), "the first epoch is every row exactly once"
    assert ids[:n] != list(range(n)), "and shuffled"
    # The next epoch is a different order of the same rows.
    assert ids[n:] == loaders(source, 1)[0].locate(np.arange(n, len(ids)))[1].tolist()


@pytest.mark.parametrize("resume_ranks", [4, 2, 1])
def test_resume_mid_epoch_matches_uninterrupted(source, resume_ranks):
    steps, cut = 2 * len(source) // GLOBAL + 3, 7  # crosses epoch boundaries
    ranks = loaders(source, 4)
    reference = [global_batch(ranks) for _ in range(steps)]

    first = loaders(source, 4)
    got = [global_batch(first) for _ in range(cut)]
    state = first[0].state_dict()
    assert all(r.state_dict() == state for r in first)
    resumed = loaders(source, resume_ranks)
    for r in resumed:
        r.load_state_dict(dict(state))
    got += [global_batch(resumed) for _ in range(steps - cut)]
    assert all((a == b).all() for a, b in zip(got, reference))


def test_resume_with_other_data_or_seed_is_refused(source):
    state = loaders(source, 1, seed=3)[0].state_dict()
    with pytest.raises(ConfigError, match="seed"):
        loaders(source, 1, seed=4)[0].load_state_dict(state)
    other = PackedSequences(np.arange(5000) % 250, SEQ)
    with pytest.raises(ConfigError, match="other data"):
        loaders(other, 1, seed=3)[0].load_state_dict(state)


@pytest.mark.parametrize("step", [-1, "3", 2.0, True, None])
def test_damaged_data_position_is_refused(source, step):
    state = dict(loaders(source, 1)[0].state_dict(), step=step)
    with pytest.raises(
        CheckpointError, match=r"data position \(step\) is .*the checkpoint is damaged"
    ):
        loaders(source, 1)[0].load_state_dict(state)


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory) -> list[PreparedSequences]:
    """Three corpora whose tokens tell them apart: letters a-c, x-z, 1-3."""
    root = tmp_path_factory.mktemp("blend")
    out = []
    for i, alphabet in enumerate(("abc", "xyz", "123")):
        folder = write_text_files(root / f"in{i}", make_documents(10 + 15 * i, i, alphabet))
        prepare(str(folder), "byte", str(root / f"out{i}"), workers=1)
        out.append(PreparedSequences(PreparedDataset(root / f"out{i}"), 16))
    return out


@pytest.mark.parametrize("weights", [(0.5, 0.3, 0.2), (7.0, 2.5, 0.5), (1, 1, 1)])
def test_blend_token_shares_match_weights_in_every_window(three_sources, weights):
    classes = {ord(c): k for k, cs in enumerate(("abc", "xyz", "123")) for c in cs}
    ranks = [
        GlobalBatchLoader(three_sources, 64, 8, r, 4, seed=1, weights=weights) for r in range(4)
    ]
    counts = []  # tokens of each source in each served sequence, read from the tokens
    for _ in range(200):
        rows = global_batch(ranks)[:, :-1]
        for row in rows:
            kinds = {classes[t] for t in row.tolist() if t in classes}
            assert len(kinds) == 1, "a sequence comes from one source"
            c = np.zeros(3)
            c[kinds.pop()] = len(row)
            counts.append(c)
    counts = np.array(counts)  # [12800 sequences, 3]
    share = np.asarray(weights) / sum(weights)
    window = 1000
    cum = np.concatenate([np.zeros((1, 3)), np.cumsum(counts, axis=0)])
    in_window = (cum[window:] - cum[:-window]) / (window * 16)
    worst = np.abs(in_window - share).max()
    assert worst <= 0.005, f"token share off by {worst:.4f} in some window of {window}"


def test_document_positions_and_cu_seqlens():
    # Documents of 3, 5 and 10 tokens (end-of-document token 99 included).
    tokens = np.array([1, 2, 99, 3, 4, 5, 6, 99, *range(10, 19), 99, 7])
    src = PackedSequences(tokens, 8, eos_id=99)
    loader = GlobalBatchLoader(src, 2, 2, 0, 1, seed=0, shuffle=False, document_positions=True)
    batch = next(loader)
    assert batch.positions is not None and batch.cu_seqlens is not None
    assert batch.positions[0].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]]
    assert [c.tolist() for c in batch.cu_seqlens[0]] == [[0, 3, 8], [0, 8]]
