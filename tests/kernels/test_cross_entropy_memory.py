"""The fused CE's logits memory is bounded by its chunk: measured, not assumed.

Every tensor allocation torch makes on the CPU is recorded with ``torch.profiler``
(``profile_memory=True``); from the allocation/free events in time order we get the largest
single allocation and the peak of live bytes during forward + backward. The reference must show
the full [N, V] logits (this proves the measurement sees them); the fused version must not.

Under the Triton interpreter the kernel's own block temporaries are numpy arrays the profiler
does not see; they are one block of one row at a time. The torch-chunked path has no such gap.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from kernel_testing import measure

from eurotrain.kernels import reference
from eurotrain.kernels._runtime import triton_importable
from eurotrain.kernels.cross_entropy import linear_cross_entropy

NUM_TOKENS, HIDDEN, VOCAB = 256, 16, 32000
FULL_LOGITS_BYTES = NUM_TOKENS * VOCAB * 4
PATHS = [
    pytest.param(
        True, id="triton", marks=pytest.mark.skipif(not triton_importable(), reason="no triton")
    ),
    pytest.param(False, id="torch-chunked"),
]


def _step(fn, **kwargs):
    hidden = torch.randn(NUM_TOKENS, HIDDEN, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, requires_grad=True)
    labels = torch.randint(0, VOCAB, (NUM_TOKENS,))

    def run():
        fn(hidden, weight, labels, **kwargs).backward()

    return run


def test_measurement_sees_the_reference_logits():
    largest, peak = measure(_step(reference.linear_cross_entropy))
    assert largest >= FULL_LOGITS_BYTES
    assert peak >= 2 * FULL_LOGITS_BYTES  # logits and their gradient


@contextmanager
def collected_often(interpreted: bool) -> Iterator[None]:
    """The Triton interpreter keeps each launch's arguments in reference cycles until the
    collector runs (triton 3.7: up to three chunks of logits at Python's default threshold, 3.9:
    one); a launch on a GPU keeps nothing. Collecting often shows what the wrapper keeps."""
    if not interpreted:
        yield
        return
    before = gc.get_threshold()
    gc.set_threshold(100)
    try:
        yield
    finally:
        gc.set_threshold(*before)


@pytest.mark.parametrize("use_triton", PATHS)
def test_fused_logits_memory_is_bounded_by_the_chunk(use_triton):
    chunk = 32
    chunk_bytes = chunk * VOCAB * 4
    with collected_often(use_triton):
        largest, peak = measure(
            _step(linear_cross_entropy, chunk_size=chunk, use_triton=use_triton)
        )
    # Outputs that exist whatever the chunk: d weight [V, D] and d hidden [N, D], fp32.
    fixed = (VOCAB + NUM_TOKENS) * HIDDEN * 4
    assert largest <= chunk_bytes
    assert peak <= fixed + 4 * chunk_bytes  # a few chunk-sized temporaries at most
    assert peak < FULL_LOGITS_BYTES / 2

    # And it grows with the chunk, by a small multiple of the extra chunk bytes.
    with collected_often(use_triton):
        _, peak_big = measure(
            _step(linear_cross_entropy, chunk_size=4 * chunk, use_triton=use_triton)
        )
    extra = 3 * chunk_bytes
    assert extra * 0.9 <= peak_big - peak <= 4 * extra
