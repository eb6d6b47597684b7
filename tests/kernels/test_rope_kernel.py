"""Triton rotary embedding against the reference; when it works in place, and when it must not."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_close

from eurotrain.kernels import reference
from eurotrain.kernels.rope import apply_rotary, inplace_is_safe

# (batch, seq, q heads, kv heads, head_dim); head_dim 24 gives a non-power-of-two half.
SHAPES = [(2, 5, 4, 2, 16), (1, 7, 6, 2, 24), (2, 3, 3, 1, 8)]
DTYPES = [torch.float32, torch.bfloat16]


def _cos_sin(seq, head_dim, device):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device) / head_dim))
    angles = torch.arange(seq, device=device)[:, None] * inv_freq[None]
    return angles.cos(), angles.sin()


def _project(proj, x, shape, layout):
    """q and k as a model makes them: views of one projection's output."""
    batch, seq, hq, hkv, dim = shape
    y = proj(x)
    if layout == "split":  # multi-output views: autograd forbids in-place on these
        q, k = y.split([hq * dim, hkv * dim], dim=-1)
        return q.reshape(batch, seq, hq, dim), k.reshape(batch, seq, hkv, dim)
    q = y[..., : hq * dim].view(batch, seq, hq, dim)
    k = y[..., hq * dim :].view(batch, seq, hkv, dim)
    if layout == "heads_first":  # [B, H, S, D] storage seen as [B, S, H, D]: strided, D unit
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    return q, k


def _run(fn, proj, x, shape, layout, cos, sin):
    proj.zero_grad()
    q, k = _project(proj, x, shape, layout)
    q_out, k_out = fn(q, k, cos, sin)
    # A loss that weighs every element differently, so a wrong rotation cannot cancel.
    loss = (q_out.float() ** 2).sum() + (
        k_out.float() * torch.linspace(-1, 2, k_out.shape[-1], device=k_out.device)
    ).sum()
    loss.backward()
    return q_out.detach(), k_out.detach(), proj.weight.grad.clone(), q


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["view", "split", "heads_first"])
def test_matches_reference(shape, dtype, layout, device):
    batch, seq, hq, hkv, dim = shape
    proj = torch.nn.Linear(8, (hq + hkv) * dim, device=device).to(dtype)
    x = torch.randn(batch, seq, 8, device=device).to(dtype)
    cos, sin = _cos_sin(seq, dim, device)
    got = _run(apply_rotary, proj, x, shape, layout, cos, sin)
    want = _run(reference.apply_rotary, proj, x, shape, layout, cos, sin)
    for g, w in zip(got[:3], want[:3]):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert_close(g, w, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_positions_per_row(dtype, device):
    """cos/sin [B, S, D/2]: each row rotated by its own positions (packed documents restart
    at 0), the same as rotating each row alone with its table."""
    batch, seq, hq, hkv, dim = shape = (2, 7, 4, 2, 16)
    proj = torch.nn.Linear(8, (hq + hkv) * dim, device=device).to(dtype)
    x = torch.randn(batch, seq, 8, device=device).to(dtype)
    cos_full, sin_full = _cos_sin(seq, dim, device)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]], device=device)
    cos, sin = cos_full[positions], sin_full[positions]
    got = _run(apply_rotary, proj, x, shape, "view", cos, sin)
    want = _run(reference.apply_rotary, proj, x, shape, "view", cos, sin)
    for g, w in zip(got[:3], want[:3]):
        assert_close(g, w, dtype)
    q, k = _project(proj, x, shape, "view")
    for row in range(batch):
        q_row, k_row = reference.apply_rotary(
            q[row : row + 1], k[row : row + 1], cos[row], sin[row]
        )
        assert_close(got[0][row : row + 1], q_row.detach(), dtype)
        assert_close(got[1][row : row + 1], k_row.detach(), dtype)


def test_inplace_only_where_autograd_allows_it(device):
    proj = torch.nn.Linear(8, 6 * 16, device=device)
    x = torch.randn(2, 5, 8, device=device)
    q, _ = _project(proj, x, (2, 5, 4, 2, 16), "view")
    assert inplace_is_safe(q)
    q_split, _ = _project(proj, x, (2, 5, 4, 2, 16), "split")
    assert not inplace_is_safe(q_split)
    leaf = torch.randn(2, 5, 4, 16, device=device, requires_grad=True)
    assert not inplace_is_safe(leaf)
    assert not inplace_is_safe(leaf.view(2, 5, 4, 16))  # a view of that leaf
    q_leaf_view, k_leaf_view = leaf.view(2, 5, 4, 16), leaf[:, :, :2]
    apply_rotary(q_leaf_view, k_leaf_view, *_cos_sin(5, 16, device))  # must not raise
    assert not inplace_is_safe(torch.randn(2, 5, 4, 16, device=device))  # caller's data


def test_inplace_writes_into_q_and_marks_it_dirty(device):
    proj = torch.nn.Linear(8, 6 * 16, device=device)
    x = torch.randn(2, 5, 8, device=device)
    q, k = _project(proj, x, (2, 5, 4, 2, 16), "view")
    version = q._version
    cos, sin = _cos_sin(5, 16, device)
    q_out, k_out = apply_rotary(q, k, cos, sin)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    assert q._version > version  # autograd knows: a stale saved q fails loudly (next test)


def test_stale_use_of_overwritten_q_is_caught(device):
    proj = torch.nn.Linear(8, 6 * 16, device=device)
    q, k = _project(proj, torch.randn(2, 5, 8, device=device), (2, 5, 4, 2, 16), "view")
    squared = q * q  # saves q for its backward
    cos, sin = _cos_sin(5, 16, device)
    q_out, k_out = apply_rotary(q, k, cos, sin)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (squared.sum() + q_out.sum() + k_out.sum()).backward()


def test_outside_autograd_inputs_are_untouched(device):
    q = torch.randn(2, 5, 4, 16, device=device)
    k = torch.randn(2, 5, 2, 16, device=device)
    q0, k0 = q.clone(), k.clone()
    cos, sin = _cos_sin(5, 16, device)
    with torch.no_grad():
        q_out, k_out = apply_rotary(q, k, cos, sin)
    assert torch.equal(q, q0) and torch.equal(k, k0)
    q_ref, k_ref = reference.apply_rotary(q0, k0, cos, sin)
    assert_close(q_out, q_ref, torch.float32)
    assert_close(k_out, k_ref, torch.float32)


def test_strided_head_dim_is_copied_not_rotated_in_place(device):
    wide = torch.randn(2, 5, 4, 32, device=device, requires_grad=True)
    q = (wide * 1.0)[..., ::2]  # stride 2 on D
    k = torch.randn(2, 5, 2, 16, device=device)
    cos, sin = _cos_sin(5, 16, device)
    assert not inplace_is_safe(q)
    got = apply_rotary(q, k, cos, sin)
    want = reference.apply_rotary(q, k, cos, sin)
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32)


def test_bad_cos_shape_is_a_value_error(device):
    q = torch.randn(1, 4, 2, 8, device=device)
    with pytest.raises(ValueError, match="cos/sin must be"):
        apply_rotary(q, q, torch.ones(3, 4, device=device), torch.ones(3, 4, device=device))
