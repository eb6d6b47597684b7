"""Fused chunked linear + cross-entropy against the reference that materialises the logits.

Both chunk implementations are checked: the Triton kernel and the plain-torch one that runs
where Triton cannot. Includes a 32000-token vocabulary split into several token chunks.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_close, assert_within_bound, linear_ce_exact

from eurotrain.kernels import reference
from eurotrain.kernels._runtime import triton_importable
from eurotrain.kernels.cross_entropy import default_chunk_size, linear_cross_entropy

PATHS = [
    pytest.param(
        True, id="triton", marks=pytest.mark.skipif(not triton_importable(), reason="no triton")
    ),
    pytest.param(False, id="torch-chunked"),
]
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(num_tokens, hidden_dim, vocab, dtype, device, ignore_every=5):
    hidden = torch.randn(num_tokens, hidden_dim, device=device).to(dtype)
    # The offset gives every row's logits a non-zero mean, which label smoothing depends on.
    weight = (torch.randn(vocab, hidden_dim, device=device) * 0.2 + 0.05).to(dtype)
    labels = torch.randint(0, vocab, (num_tokens,), device=device)
    labels[::ignore_every] = -100
    return hidden, weight, labels


def _run(fn, hidden, weight, labels, grad_scale=2.5, **kwargs):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = fn(hidden, weight, labels, **kwargs)
    (loss * grad_scale).backward()  # a non-unit incoming gradient must be applied
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("use_triton", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_32k_vocab_in_chunks_matches_reference(
    use_triton, dtype, reduction, label_smoothing, device
):
    hidden, weight, labels = _inputs(48, 32, 32000, dtype, device)
    options = {"reduction": reduction, "label_smoothing": label_smoothing}
    got = _run(
        linear_cross_entropy,
        hidden,
        weight,
        labels,
        chunk_size=16,
        use_triton=use_triton,
        **options,
    )
    want = _run(reference.linear_cross_entropy, hidden, weight, labels, **options)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
    if dtype == torch.bfloat16:
        for g, w in zip(got, want):
            assert_close(g, w, dtype)
        return
    # fp32: the kernel must lie within the rounding-error bound of the exact (fp64) result,
    # whatever order a CPU or GPU adds the 32000 terms in. Not compared elementwise with the
    # eager reference: with label smoothing, PyTorch's log-softmax backward sums the smoothed
    # target (32000 equal terms) in fp32, a systematic error of up to ~1e-4 relative that
    # depends on the CPU's vector width (seen: 2.7e-3 on near-zero elements of one machine).
    exact = linear_ce_exact(hidden.cpu(), weight.cpu(), labels.cpu(), grad_scale=2.5, **options)
    for g, (value, bound) in zip(got, exact):
        assert_within_bound(g.cpu(), value, bound)


@pytest.mark.parametrize("use_triton", PATHS)
def test_3d_non_contiguous_hidden_and_2d_labels(use_triton, device):
    hidden = torch.randn(3, 2, 40, device=device).transpose(0, 1)  # [B=2, S=3, D=40], strided
    weight = torch.randn(1000, 40, device=device) * 0.2
    labels = torch.randint(0, 1000, (2, 3), device=device)
    got = _run(linear_cross_entropy, hidden, weight, labels, chunk_size=4, use_triton=use_triton)
    want = _run(
        lambda h, w, y: reference.linear_cross_entropy(h.reshape(-1, 40), w, y.reshape(-1)),
        hidden,
        weight,
        labels,
    )
    assert got[1].shape == hidden.shape
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32)


@pytest.mark.parametrize("use_triton", PATHS)
def test_frozen_weight_and_no_grad(use_triton, device):
    hidden, weight, labels = _inputs(20, 16, 500, torch.float32, device)
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(h, weight, labels, chunk_size=8, use_triton=use_triton)
    loss.backward()
    h_ref = hidden.clone().requires_grad_()
    reference.linear_cross_entropy(h_ref, weight, labels).backward()
    assert weight.grad is None
    assert_close(h.grad, h_ref.grad, torch.float32)
    with torch.no_grad():
        no_grad_loss = linear_cross_entropy(hidden, weight, labels, use_triton=use_triton)
    assert_close(
        no_grad_loss, reference.linear_cross_entropy(hidden, weight, labels), torch.float32
    )


def test_all_labels_ignored(device):
    hidden, weight, _ = _inputs(6, 8, 50, torch.float32, device)
    labels = torch.full((6,), -100, device=device)
    assert linear_cross_entropy(hidden, weight, labels).item() == 0.0
    mean = linear_cross_entropy(hidden, weight, labels, reduction="mean")
    assert torch.isnan(mean) and torch.isnan(
        reference.linear_cross_entropy(hidden, weight, labels, reduction="mean")
    )


def test_second_backward_with_another_gradient_is_refused(device):
    hidden, weight, labels = _inputs(6, 8, 50, torch.float32, device)
    loss = linear_cross_entropy(hidden.requires_grad_(), weight, labels)
    loss.backward(torch.tensor(2.0), retain_graph=True)
    with pytest.raises(RuntimeError, match="different incoming gradients"):
        loss.backward(torch.tensor(3.0))


@pytest.mark.parametrize("use_triton", PATHS)
def test_second_backward_with_the_same_gradient_accumulates_again(use_triton, device):
    # As for any graph kept with retain_graph: the gradients are added a second time.
    hidden, weight, labels = _inputs(12, 8, 50, torch.float32, device)
    _, h_once, w_once = _run(reference.linear_cross_entropy, hidden, weight, labels)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, labels, chunk_size=5, use_triton=use_triton) * 2.5
    loss.backward(retain_graph=True)
    loss.backward()
    assert_close(h.grad, 2 * h_once, torch.float32)
    assert_close(w.grad, 2 * w_once, torch.float32)


@pytest.mark.parametrize("use_triton", PATHS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_split_backward_input_then_weight_equals_one_backward(use_triton, reduction, device):
    # A zero-bubble pipeline schedule's split: d input first (graph kept), then d weight from
    # the same graph, which runs the loss's backward a second time with the same gradient.
    hidden, weight, labels = _inputs(20, 16, 300, torch.float32, device)

    def loss_fn(h, w, y, **kwargs):
        return linear_cross_entropy(torch.tanh(h), w, y, **kwargs)

    options = {"chunk_size": 8, "use_triton": use_triton, "reduction": reduction}
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = loss_fn(h, w, labels, **options) * 2.5
    (grad_h,) = torch.autograd.grad(loss, [h], retain_graph=True)
    (grad_w,) = torch.autograd.grad(loss, [w])
    _, want_h, want_w = _run(loss_fn, hidden, weight, labels, **options)
    assert torch.equal(grad_h, want_h) and torch.equal(grad_w, want_w)


def test_bad_arguments_are_value_errors(device):
    hidden, weight, labels = _inputs(6, 8, 50, torch.float32, device)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="labels for"):
        linear_cross_entropy(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="does not match hidden dim"):
        linear_cross_entropy(hidden, weight[:, :4], labels)


def test_default_chunk_size():
    # Llama-3-8B, 8192 tokens: logits chunk ~ the size of the hidden input, a power of two.
    assert default_chunk_size(8192, 4096, 128256) == 512
    assert default_chunk_size(100, 4096, 128256) == 100  # never more than the tokens
    assert default_chunk_size(100000, 64, 1000) == 8192
