"""Shared helpers for the kernel tests: the stated tolerances and the comparison using them,
and a measurement of the memory a function allocates."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

# Tolerances, stated once (docs/kernels.md repeats them). Compared per element as
# |actual - expected| <= atol * max|expected| + rtol * |expected|: atol is relative to the
# largest value of the reference tensor, so one number serves tensors of any scale.
# fp32: the kernels differ from eager only in summation order and fused multiply-adds.
# bf16: both sides round to bf16 (8 bits of mantissa) at slightly different points; 2e-2
# allows about two bf16 ulps.
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2e-2, "atol": 1e-2},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Elementwise comparison with the tolerances of ``dtype`` (see TOLERANCES)."""
    tol = TOLERANCES[dtype]
    expected = expected.detach().float()
    actual = actual.detach().float()
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1e-12)
    )


# ---- fp32 error bounds derived from the numerics, for long reductions ----------------------
# A fixed rtol cannot serve a sum over a 32000-token vocabulary: the reference and the kernel
# add the same terms in different orders (BLAS blocking and SIMD width differ between CPUs), and
# elements that are sums of many terms cancelling to near zero differ by much more than 1e-5 of
# their value. Instead each element gets the probabilistic rounding-error bound of the sums that
# produce it (Higham & Mary 2019): an fp32 sum of n terms with absolute values summing to S is
# within LAMBDA * sqrt(n) * u * S of the exact sum, except with probability about
# 2 exp(-LAMBDA^2 / 2) (~3e-8 for LAMBDA 6) per element, whatever the summation order.
U32 = 2.0**-24
LAMBDA = 6.0


def sum_bound(n: int, abs_sum: torch.Tensor | float) -> torch.Tensor | float:
    """Rounding error of an fp32 sum of ``n`` terms whose absolute values sum to ``abs_sum``."""
    return (LAMBDA * n**0.5 + 1.0) * U32 * abs_sum


def linear_ce_exact(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float,
    reduction: str,
    grad_scale: float,
    ignore_index: int = -100,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(exact value in fp64, fp32 error bound) for the loss, d hidden and d weight of
    ``grad_scale * linear_cross_entropy(hidden, weight, labels)``, propagating the bound of each
    fp32 sum (logits: length D; log-sum-exp: length V; d hidden: V; d weight and loss: N)."""
    h, w = hidden.double(), weight.double()
    n, d = h.shape
    v = w.shape[0]
    ls = label_smoothing
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    rows = torch.arange(n)
    z = h @ w.t()
    ez = sum_bound(d, h.abs() @ w.abs().t())  # each logit's error
    p = torch.softmax(z, 1)
    lse = torch.logsumexp(z, 1)
    # log-sum-exp: the logits' errors weighted by softmax, the relative error of a sum of v
    # positive terms, and a few roundings of exp / log / max.
    e_lse = (p * ez).sum(1) + sum_bound(v, 1.0) + 4 * U32 * (lse.abs() + 1)
    loss_rows = lse - (1 - ls) * z[rows, safe] - ls * z.mean(1)
    e_rows = e_lse + (1 - ls) * ez[rows, safe] + ls * (ez.mean(1) + sum_bound(v, z.abs().mean(1)))
    loss_rows, e_rows = loss_rows * valid, e_rows * valid
    loss = loss_rows.sum()
    e_loss = e_rows.sum() + sum_bound(n, loss_rows.abs().sum())
    # d logits = softmax - smoothed one-hot; its error follows the logits' and lse's errors.
    g = p - ls / v
    g[rows, safe] -= 1 - ls
    g = g * valid[:, None]
    e_g = (p * (ez + e_lse[:, None]) + 4 * U32 * g.abs()) * valid[:, None]
    scale = grad_scale / (valid.sum().double() if reduction == "mean" else 1.0)
    if reduction == "mean":
        loss, e_loss = loss * scale / grad_scale, e_loss * scale / grad_scale + U32 * loss.abs()
    gh = scale * (g @ w)
    e_gh = scale * (e_g @ w.abs() + sum_bound(v, g.abs() @ w.abs())) + U32 * gh.abs()
    gw = scale * (g.t() @ h)
    e_gw = scale * (e_g.t() @ h.abs() + sum_bound(n, g.abs().t() @ h.abs())) + U32 * gw.abs()
    return [(loss, e_loss), (gh, e_gh), (gw, e_gw)]


def bound_ratio(actual: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> float:
    """The largest error / bound over the elements (<= 1 when within the bound); an element
    with a zero bound (an ignored token's gradient) counts 0 when exact, infinity otherwise."""
    err = (actual.detach().double() - exact).abs()
    ratio = torch.where(bound > 0, err / bound.clamp_min(1e-300), err * float("inf"))
    return float(ratio.nan_to_num(0.0).max()) if ratio.numel() else 0.0


def assert_within_bound(actual: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> None:
    """Every element of ``actual`` lies within its error bound of the exact (fp64) value."""
    err = (actual.detach().double() - exact).abs()
    excess = err - bound
    worst = int(excess.argmax()) if excess.numel() else 0
    assert bool((excess <= 0).all()), (
        f"{int((excess > 0).sum())} of {err.numel()} elements exceed their fp32 error bound; "
        f"worst at flat index {worst}: error {err.flatten()[worst]:.3e}, "
        f"bound {bound.flatten()[worst]:.3e}"
    )


# ---- memory, measured ----------------------------------------------------------------------
def _allocation_events(prof) -> list[tuple[int, int]]:
    """(time, bytes) of every allocation (+) and free (-) the profiler saw, in time order."""
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        size = getattr(node.extra_fields, "alloc_size", None)
        device = getattr(node.extra_fields, "device", None)
        if size is not None and device is not None and device.type == "cpu":
            events.append((node.start_time_ns, size))
    events.sort()
    return events


def measure(fn: Callable[[], object]) -> tuple[int, int]:
    """(largest single allocation, peak live bytes above the start) of CPU tensors while fn
    runs, from every allocation and free ``torch.profiler`` records (profile_memory=True)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = largest = 0
    for _, size in _allocation_events(prof):
        live += size
        peak = max(peak, live)
        largest = max(largest, size)
    return largest, peak
