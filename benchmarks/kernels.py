"""Benchmark the fused kernels against eager PyTorch, torch.compile and Liger-Kernel.

For each model shape (Llama-3-8B, Llama-3-70B) and each op (RMSNorm, RoPE, SwiGLU, fused
linear + cross-entropy) it times forward + backward with CUDA events after a warmup, derives
the achieved memory bandwidth of the memory-bound ops from the bytes they must move at least,
records the peak extra memory of one step, and prints one table with eager PyTorch as the
named baseline. It writes the table as JSON and a PNG plot (when matplotlib is installed) to
``--out-dir``, named by hardware and date.

    python -m benchmarks.kernels                    # on a GPU: 8B and 70B at 8192 tokens
    python -m benchmarks.kernels --tokens 16384 --models 8b --peak-gbps 3350
    python -m benchmarks.kernels --cpu-smoke        # tiny shapes, same code path, on CPU

Without a GPU (and without --cpu-smoke) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


MODELS = {
    "8b": Shape("Llama-3-8B", 4096, 14336, 32, 8, 128, 128256),
    "70b": Shape("Llama-3-70B", 8192, 28672, 64, 8, 128, 128256),
}
SMOKE = Shape("cpu-smoke", 64, 176, 4, 2, 16, 1000)

# HBM peak per device (GB/s), matched on the device name. MN5's H100 64 GB (HBM2e) is not an
# SXM H100: it is left unknown (pass --peak-gbps after measuring it).
PEAK_GBPS = [
    ("GH200", 4000.0),
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("MI300X", 5300.0),
    ("MI250X", 1600.0),  # per GCD, which is what torch sees as one device
    ("MI250", 1600.0),
]


def detect_peak_gbps(device_name: str, total_gib: float) -> float | None:
    if "H100" in device_name and "PCIe" not in device_name and total_gib < 70:
        return None  # a 64 GB H100 (MareNostrum 5): HBM2e, peak not published
    for key, gbps in PEAK_GBPS:
        if key in device_name:
            return gbps
    return None


@dataclass
class Case:
    """One op at one shape: fresh inputs (untimed), one forward + backward (timed)."""

    op: str
    make_inputs: Callable[[], tuple]
    bytes_moved: int | None  # minimum HBM traffic of forward + backward; None: compute-bound
    flops: int | None


def make_cases(shape: Shape, tokens: int, dtype: torch.dtype, device: torch.device) -> list[Case]:
    t, d, f = tokens, shape.hidden, shape.ffn
    e = torch.tensor([], dtype=dtype).element_size()

    def leaf(*size, scale=1.0):
        return (torch.randn(*size, device=device, dtype=dtype) * scale).requires_grad_()

    # Shared, allocated once; the step functions only create per-step views and gradients.
    x, w = leaf(t, d), leaf(d)
    qk = torch.randn(
        1, t, (shape.heads + shape.kv_heads) * shape.head_dim, device=device, dtype=dtype
    )
    qk.requires_grad_()
    angles = torch.arange(t, device=device)[:, None] * torch.rand(
        shape.head_dim // 2, device=device
    )
    cos, sin = angles.cos(), angles.sin()
    a, b = leaf(t, f), leaf(t, f)
    h, w_out = leaf(t, d), leaf(shape.vocab, d, scale=0.02)
    labels = torch.randint(0, shape.vocab, (t,), device=device)

    def rope_inputs():
        # A non-leaf q/k, as in a model (a projection's output), so in-place kernels may run.
        y = qk * 1.0
        q = y[..., : shape.heads * shape.head_dim].view(1, t, shape.heads, shape.head_dim)
        k = y[..., shape.heads * shape.head_dim :].view(1, t, shape.kv_heads, shape.head_dim)
        return q, k, cos, sin

    qk_elems = t * (shape.heads + shape.kv_heads) * shape.head_dim
    return [
        Case("rms_norm", lambda: (x, w, 1e-5), 5 * t * d * e, None),
        Case("apply_rotary", rope_inputs, 4 * qk_elems * e, None),
        Case("swiglu", lambda: (a, b), 8 * t * f * e, None),
        Case("linear_cross_entropy", lambda: (h, w_out, labels), None, 6 * t * d * shape.vocab),
    ]


def implementations(names: list[str]) -> dict[str, dict[str, Callable]]:
    """{impl name: {op name: callable}}; Liger only when importable."""
    from eurotrain.kernels import reference
    from eurotrain.kernels.cross_entropy import linear_cross_entropy
    from eurotrain.kernels.rmsnorm import rms_norm
    from eurotrain.kernels.rope import apply_rotary
    from eurotrain.kernels.swiglu import swiglu

    ref = {
        "rms_norm": reference.rms_norm,
        "apply_rotary": reference.apply_rotary,
        "swiglu": reference.swiglu,
        "linear_cross_entropy": reference.linear_cross_entropy,
    }
    impls: dict[str, dict[str, Callable]] = {}
    if "eager" in names:
        impls["eager"] = ref
    if "compile" in names:
        impls["compile"] = {op: torch.compile(fn) for op, fn in ref.items()}
    if "ours" in names:
        impls["ours"] = {
            "rms_norm": rms_norm,
            "apply_rotary": apply_rotary,
            "swiglu": swiglu,
            "linear_cross_entropy": linear_cross_entropy,
        }
    if "liger" in names:
        try:
            from liger_kernel.transformers import functional as liger
        except ImportError:
            print("liger_kernel is not importable: Liger-Kernel columns skipped")
        else:

            def liger_rope(q, k, cos, sin):
                # Liger wants [B, H, S, D] and the full-width HF cos/sin [1, S, D].
                cos_full = torch.cat((cos, cos), dim=-1)[None]
                sin_full = torch.cat((sin, sin), dim=-1)[None]
                return liger.liger_rope(q.transpose(1, 2), k.transpose(1, 2), cos_full, sin_full)

            impls["liger"] = {
                "rms_norm": lambda x, w, eps: liger.liger_rms_norm(x, w, eps),
                "apply_rotary": liger_rope,
                "swiglu": liger.liger_swiglu,
                "linear_cross_entropy": lambda h, w, y: liger.liger_fused_linear_cross_entropy(
                    h, w, y, reduction="sum"
                ),
            }
    return impls


def _step(fn: Callable, inputs: tuple) -> None:
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    # sum() of every output: a cheap, fixed reduction identical for all implementations.
    torch.stack([o.float().sum() for o in outs]).sum().backward()


def _clear_grads(inputs: tuple) -> None:
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.is_leaf and t.requires_grad:
            t.grad = None


def measure(fn: Callable, case: Case, warmup: int, iters: int, device: torch.device) -> dict:
    """Mean ms of forward + backward (input preparation excluded) and peak extra memory."""
    for _ in range(warmup):
        inputs = case.make_inputs()
        _step(fn, inputs)
        _clear_grads(inputs)
    total_ms = 0.0
    peak_mib = None
    for i in range(iters):
        inputs = case.make_inputs()
        if device.type == "cuda":
            torch.cuda.synchronize()
            if i == 0:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _step(fn, inputs)
            end.record()
            torch.cuda.synchronize()
            total_ms += start.elapsed_time(end)
            if i == 0:
                peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            t0 = time.perf_counter()
            _step(fn, inputs)
            total_ms += (time.perf_counter() - t0) * 1e3
        _clear_grads(inputs)
    return {"ms": total_ms / iters, "peak_mib": peak_mib}


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    shapes = [SMOKE] if args.cpu_smoke else [MODELS[m] for m in args.models]
    tokens = 64 if args.cpu_smoke else args.tokens
    impls = implementations(args.impls)
    rows = []
    for shape in shapes:
        for case in make_cases(shape, tokens, dtype, device):
            eager = None
            for impl, ops in impls.items():
                try:
                    result = measure(ops[case.op], case, args.warmup, args.iters, device)
                except Exception as exc:  # one broken implementation must not end the run
                    print(f"{shape.name} {case.op} {impl}: failed: {type(exc).__name__}: {exc}")
                    continue
                row = {"model": shape.name, "op": case.op, "impl": impl, "tokens": tokens, **result}
                seconds = result["ms"] / 1e3
                row["gbps"] = case.bytes_moved / seconds / 1e9 if case.bytes_moved else None
                row["tflops"] = case.flops / seconds / 1e12 if case.flops else None
                row["pct_peak"] = (
                    100 * row["gbps"] / args.peak_gbps if row["gbps"] and args.peak_gbps else None
                )
                if impl == "eager":
                    eager = row
                row["speedup_vs_eager"] = eager["ms"] / row["ms"] if eager else None
                row["mem_vs_eager"] = (
                    row["peak_mib"] / eager["peak_mib"]
                    if eager and eager["peak_mib"] and row["peak_mib"] is not None
                    else None
                )
                rows.append(row)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def _fmt(value: float | None, spec: str) -> str:
    """format(value, spec), or a dash padded to the same width when there is no value."""
    width = int(spec.split(".")[0] or 0)
    return "-".rjust(width) if value is None else format(value, spec)


def _ratio(value: float | None, width: int) -> str:
    return ("-" if value is None else f"{value:.2f}x").rjust(width)


def print_table(rows: list[dict], device_name: str, peak_gbps: float | None) -> None:
    print(
        f"\ndevice: {device_name}; HBM peak: {_fmt(peak_gbps, '.0f')} GB/s; baseline: eager PyTorch"
    )
    header = (
        f"{'model':12s} {'op':21s} {'impl':8s} {'ms':>9s} {'GB/s':>8s} {'%peak':>6s} "
        f"{'TFLOP/s':>8s} {'peak MiB':>9s} {'speedup':>8s} {'mem/eager':>9s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:12s} {r['op']:21s} {r['impl']:8s} {r['ms']:9.3f} "
            f"{_fmt(r['gbps'], '8.1f')} {_fmt(r['pct_peak'], '6.1f')} {_fmt(r['tflops'], '8.2f')} "
            f"{_fmt(r['peak_mib'], '9.0f')} {_ratio(r['speedup_vs_eager'], 8)} "
            f"{_ratio(r['mem_vs_eager'], 9)}"
        )


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install matplotlib)")
        return False
    models = sorted({r["model"] for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(7 * len(models), 8), squeeze=False)
    for col, model in enumerate(models):
        for row_index, (key, label) in enumerate(
            [
                ("speedup_vs_eager", "speedup vs eager (fwd+bwd)"),
                ("mem_vs_eager", "peak memory / eager"),
            ]
        ):
            ax = axes[row_index][col]
            width = 0.8 / max(len(impls), 1)
            for i, impl in enumerate(impls):
                values = []
                for op in ops:
                    match = [
                        r
                        for r in rows
                        if r["model"] == model and r["op"] == op and r["impl"] == impl
                    ]
                    values.append((match[0][key] or 0.0) if match else 0.0)
                ax.bar([j + i * width for j in range(len(ops))], values, width, label=impl)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ops))], ops, rotation=15)
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_title(f"{model}: {label}")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["8b", "70b"])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch x seq)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--impls", nargs="+", default=None, help="eager compile ours liger")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument(
        "--peak-gbps", type=float, default=None, help="HBM peak; default: by device name"
    )
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny shapes on CPU (Triton interpreter)"
    )
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels import Triton
        args.impls = args.impls or ["eager", "ours"]
        args.warmup, args.iters = min(args.warmup, 1), min(args.iters, 1)
        device_name = "cpu (smoke run: timings mean nothing)"
    elif not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA or ROCm GPU; none is visible, nothing measured.")
        print("Use --cpu-smoke to push tiny shapes through the same code path on CPU.")
        return 0
    else:
        args.impls = args.impls or ["eager", "compile", "ours", "liger"]
        props = torch.cuda.get_device_properties(0)
        device_name = props.name
        if args.peak_gbps is None:
            args.peak_gbps = detect_peak_gbps(props.name, props.total_memory / 2**30)
            if args.peak_gbps is None:
                print(f"unknown HBM peak for {props.name!r}: pass --peak-gbps for the % column")

    rows = run(args)
    print_table(rows, device_name, args.peak_gbps)
    stamp = datetime.date.today().isoformat()
    slug = "cpu-smoke" if args.cpu_smoke else device_name.replace(" ", "-").replace("/", "-")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"kernels_{slug}_{args.tokens if not args.cpu_smoke else 64}tok_{stamp}"
    meta = {
        "device": device_name,
        "peak_gbps": args.peak_gbps,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "shapes": [
            asdict(s) for s in ([SMOKE] if args.cpu_smoke else [MODELS[m] for m in args.models])
        ],
    }
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nwrote {stem.with_suffix('.json')}")
    if plot(rows, stem.with_suffix(".png")):
        print(f"wrote {stem.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
