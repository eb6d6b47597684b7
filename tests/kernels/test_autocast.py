"""Every kernel under autocast against the PyTorch reference under the same autocast.

On a GPU without FSDP the trainer runs the forward under bf16 autocast (parallel/engine.py,
Precision), so the kernels see what autocast makes: bf16 outputs of the linear layers next to
fp32 weights and residuals. Here autocast runs on the device of the ``device`` fixture (the CPU
under Triton's interpreter), with the inputs made by real linear layers as in the model.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_close
from torch import nn

from eurotrain.kernels import reference
from eurotrain.kernels._runtime import triton_importable
from eurotrain.kernels.cross_entropy import linear_cross_entropy
from eurotrain.kernels.rmsnorm import rms_norm
from eurotrain.kernels.rope import apply_rotary
from eurotrain.kernels.swiglu import swiglu
from eurotrain.models import ModelConfig, build_model

BF16 = torch.bfloat16
PATHS = [
    pytest.param(
        True, id="triton", marks=pytest.mark.skipif(not triton_importable(), reason="no triton")
    ),
    pytest.param(False, id="torch-chunked"),
]


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=BF16)


def _ce_inputs(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = torch.randn(48, 32, device=device)
    weight = torch.randn(1000, 32, device=device) * 0.2 + 0.05
    labels = torch.randint(0, 1000, (48,), device=device)
    labels[::5] = -100
    return hidden, weight, labels


def _ce_run(fn, hidden, weight, labels, device, **kwargs):
    """Loss under autocast, backward outside it (as the trainer does); fp32 leaves."""
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    with _autocast(device):
        loss = fn(hidden, weight, labels, **kwargs)
    (loss * 2.5).backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("use_triton", PATHS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_linear_cross_entropy_under_autocast_matches_reference(
    use_triton, reduction, label_smoothing, device
):
    hidden, weight, labels = _ce_inputs(device)
    options = {"reduction": reduction, "label_smoothing": label_smoothing}
    got = _ce_run(
        linear_cross_entropy,
        hidden,
        weight,
        labels,
        device,
        chunk_size=16,  # three chunks: d weight is accumulated over them
        use_triton=use_triton,
        **options,
    )
    want = _ce_run(reference.linear_cross_entropy, hidden, weight, labels, device, **options)
    for name, g, w in zip(("loss", "d hidden", "d weight"), got, want):
        assert g.dtype == w.dtype == torch.float32, name
        assert_close(g, w, BF16)


@pytest.mark.parametrize("use_triton", PATHS)
def test_linear_cross_entropy_under_autocast_computes_in_the_autocast_dtype(use_triton, device):
    """The same numbers as on inputs cast to bf16 by hand: autocast's dtype, not fp32."""
    hidden, weight, labels = _ce_inputs(device)
    kwargs = {"chunk_size": 16, "use_triton": use_triton}
    with _autocast(device), torch.no_grad():
        under_autocast = linear_cross_entropy(hidden, weight, labels, **kwargs)
        reference_loss = reference.linear_cross_entropy(hidden, weight, labels)
    by_hand = linear_cross_entropy(hidden.to(BF16), weight.to(BF16), labels, **kwargs)
    fp32 = linear_cross_entropy(hidden, weight, labels, **kwargs)
    assert torch.equal(under_autocast, by_hand)
    assert torch.equal(
        reference_loss, reference.linear_cross_entropy(hidden.to(BF16), weight.to(BF16), labels)
    )
    assert not torch.equal(under_autocast, fp32)  # the inputs were rounded: autocast took effect


def _leaf_grads(*modules: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for m in modules for p in m.parameters()]


def _linears(device: torch.device, dim: int, *widths: int) -> list[nn.Linear]:
    torch.manual_seed(3)
    return [nn.Linear(dim, w, device=device) for w in widths]


@pytest.mark.parametrize("source", ["residual", "projection"])
def test_rms_norm_under_autocast_matches_reference(source, device):
    """The residual stream stays fp32 under autocast; a q/k projection (Qwen3's qk-norm) is
    bf16. The norm weight is an fp32 parameter in both."""
    x0 = torch.randn(2, 5, 96, device=device)
    results = []
    for fn in (rms_norm, reference.rms_norm):
        (proj,) = _linears(device, 96, 96)
        weight = nn.Parameter(torch.rand(96, device=device) + 0.5)
        x = x0.clone().requires_grad_()
        with _autocast(device):
            inp = proj(x) if source == "projection" else x
            y = fn(inp, weight, 1e-6)
        (y.float() * torch.linspace(-1, 2, 96, device=device)).sum().backward()
        used = (proj,) if source == "projection" else ()
        results.append((y.detach(), x.grad, weight.grad, *_leaf_grads(*used)))
    for got, want in zip(*results):
        assert got.dtype == want.dtype
        assert_close(got, want, BF16)


def test_apply_rotary_under_autocast_matches_reference(device):
    """q and k come out of a projection in bf16; cos/sin stay fp32 tables."""
    batch, seq, hq, hkv, head_dim = 2, 5, 4, 2, 16
    angles = torch.arange(seq, device=device)[:, None] * torch.rand(head_dim // 2, device=device)
    x0 = torch.randn(batch, seq, 32, device=device)
    results = []
    for fn in (apply_rotary, reference.apply_rotary):
        wq, wk = _linears(device, 32, hq * head_dim, hkv * head_dim)
        x = x0.clone().requires_grad_()
        with _autocast(device):
            q = wq(x).view(batch, seq, hq, head_dim)
            k = wk(x).view(batch, seq, hkv, head_dim)
            q_out, k_out = fn(q, k, angles.cos(), angles.sin())
        weights = torch.linspace(-1, 2, head_dim, device=device)
        ((q_out.float() ** 2).sum() + (k_out.float() * weights).sum()).backward()
        results.append((q_out.detach(), k_out.detach(), x.grad, *_leaf_grads(wq, wk)))
    for got, want in zip(*results):
        assert got.dtype == want.dtype
        assert_close(got, want, BF16)


def test_swiglu_under_autocast_matches_reference(device):
    """silu(w1 x) * w3 x with both projections in bf16, as in the model's MLP."""
    x0 = torch.randn(3, 7, 64, device=device)
    results = []
    for fn in (swiglu, reference.swiglu):
        w1, w3 = _linears(device, 64, 200, 200)
        x = x0.clone().requires_grad_()
        with _autocast(device):
            c = fn(w1(x), w3(x))
        (c.float() * torch.linspace(-1, 2, 200, device=device)).sum().backward()
        results.append((c.detach(), x.grad, *_leaf_grads(w1, w3)))
    for got, want in zip(*results):
        assert got.dtype == want.dtype
        assert_close(got, want, BF16)


def _model_loss_and_grads(kernels: str, device: torch.device, autocast: bool, **shape):
    cfg = ModelConfig(kernels=kernels, **shape)
    model = build_model(cfg, device)
    model.init_weights(seed=0)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 48), generator=gen).to(device)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -3:] = -100
    with torch.autocast(device.type, dtype=BF16, enabled=autocast):
        loss = model(tokens, labels)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, model.ops.describe()


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.double().flatten() for g in grads.values()])


@pytest.mark.parametrize("qk_norm", [False, True])
def test_model_under_autocast_equals_reference_kernels(qk_norm, device):
    """The whole model (model.kernels: triton) under bf16 autocast: what a single GPU runs.

    Through four layers the two paths round to bf16 at different points, so their gradients
    differ by about 1% of each parameter's largest gradient: as much as the reference under
    autocast differs from fp32. So: every gradient within 3% of its largest element, and the
    kernels' gradients, taken together, no further from fp32 than 1.5x the reference's.
    """
    shape = dict(dim=64, num_heads=4, num_kv_heads=2, ffn_dim=176, max_seq_len=64)
    shape["qk_norm"] = qk_norm
    ref_loss, ref_grads, _ = _model_loss_and_grads("torch", device, True, **shape)
    loss, grads, impl = _model_loss_and_grads("triton", device, True, **shape)
    _, fp32_grads, _ = _model_loss_and_grads("torch", device, False, **shape)
    assert set(impl.values()) == {"triton"}, impl
    assert loss.dtype == ref_loss.dtype == torch.float32
    assert_close(loss, ref_loss, BF16)
    for name, want in ref_grads.items():
        assert grads[name].dtype == want.dtype == torch.float32, name
        error = (grads[name] - want).abs().max()
        assert error <= 3e-2 * want.abs().max(), name
    fp32 = _flat(fp32_grads)
    kernel_error = (_flat(grads) - fp32).norm()
    reference_error = (_flat(ref_grads) - fp32).norm()
    assert kernel_error <= 1.5 * reference_error
