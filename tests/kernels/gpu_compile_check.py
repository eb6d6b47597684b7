"""Compile every kernel ahead of time for GPU targets, on a machine without a GPU.

The interpreter runs kernels as numpy and accepts things the real compiler rejects (type
mismatches of loop-carried values, int/float mixing, ...). ``triton.compile`` with an explicit
target runs the whole CUDA (to cubin) and ROCm (to hsaco) pipelines without a device, so this
catches those errors here. It proves the kernels compile, not that they are correct or fast on
the device. Must run with TRITON_INTERPRET unset (the test starts it in a subprocess).

Usage: python tests/kernels/gpu_compile_check.py  -> one line per (target, kernel), exit 1 on error.
"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET=1"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from eurotrain.kernels import ce_kernel, rmsnorm, rope, swiglu  # noqa: E402

TARGETS = {
    "sm_90 (H100/H200/GH200)": GPUTarget("cuda", 90, 32),
    "sm_80 (A100)": GPUTarget("cuda", 80, 32),
    "gfx90a (MI250X)": GPUTarget("hip", "gfx90a", 64),
}

# (kernel, argument types, constexpr values, num_warps): bf16 activations at Llama-70B widths.
I32 = "i32"
KERNELS = [
    (
        rmsnorm._rms_norm_fwd_kernel,
        {
            "X": "*bf16",
            "W": "*bf16",
            "Y": "*bf16",
            "RSTD": "*fp32",
            "stride_x": I32,
            "stride_y": I32,
            "n_cols": I32,
            "eps": "fp32",
        },
        {"BLOCK": 8192},
        16,
    ),
    (
        rmsnorm._rms_norm_bwd_kernel,
        {
            "DY": "*bf16",
            "X": "*bf16",
            "W": "*bf16",
            "RSTD": "*fp32",
            "DX": "*bf16",
            "DW_PARTIAL": "*fp32",
            "stride_dy": I32,
            "stride_x": I32,
            "stride_dx": I32,
            "n_rows": I32,
            "n_cols": I32,
            "rows_per_program": I32,
        },
        {"BLOCK": 8192},
        16,
    ),
    (
        rope._rope_kernel,
        {
            "X": "*bf16",
            "OUT": "*bf16",
            "COS": "*fp32",
            "SIN": "*fp32",
            "stride_xb": I32,
            "stride_xs": I32,
            "stride_xh": I32,
            "stride_ob": I32,
            "stride_os": I32,
            "stride_oh": I32,
            "stride_cb": I32,
            "stride_cs": I32,
            "seq_len": I32,
            "n_heads": I32,
            "half": I32,
        },
        {"SIN_SIGN": -1.0, "BLOCK_H": 64, "BLOCK_D": 64},
        4,
    ),
    (
        swiglu._swiglu_fwd_kernel,
        {
            "A": "*bf16",
            "B": "*bf16",
            "C": "*bf16",
            "stride_a": I32,
            "stride_b": I32,
            "stride_c": I32,
            "n_cols": I32,
        },
        {"BLOCK": 1024},
        4,
    ),
    (
        swiglu._swiglu_bwd_kernel,
        {
            "DC": "*bf16",
            "A": "*bf16",
            "B": "*bf16",
            "DA": "*bf16",
            "DB": "*bf16",
            "stride_dc": I32,
            "stride_a": I32,
            "stride_b": I32,
            "stride_da": I32,
            "stride_db": I32,
            "n_cols": I32,
        },
        {"BLOCK": 1024},
        4,
    ),
    (
        ce_kernel._ce_stats_kernel,
        {
            "LOGITS": "*bf16",
            "LABELS": "*i64",
            "STATS": "*fp32",
            "stride_row": I32,
            "n_rows": I32,
            "n_cols": I32,
            "vocab_start": I32,
            "ignore_index": I32,
        },
        {"BLOCK": 4096},
        8,
    ),
    (
        ce_kernel._ce_grad_kernel,
        {
            "LOGITS": "*bf16",
            "LABELS": "*i64",
            "LSE": "*fp32",
            "stride_row": I32,
            "n_cols": I32,
            "vocab_start": I32,
            "vocab_size": I32,
            "ignore_index": I32,
            "label_smoothing": "fp32",
        },
        {"BLOCK": 4096},
        8,
    ),
]


def main() -> int:
    failed = 0
    for target_name, target in TARGETS.items():
        for kernel, types, constexprs, num_warps in KERNELS:
            signature = dict(types)
            signature.update({name: "constexpr" for name in constexprs})
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            try:
                compiled = triton.compile(source, target=target, options={"num_warps": num_warps})
                binary = "cubin" if target.backend == "cuda" else "hsaco"
                status = "ok" if compiled.asm.get(binary) else f"no {binary}"
            except Exception as exc:  # report every kernel, then fail
                status = f"FAILED: {type(exc).__name__}: {exc}"
            failed += not status.startswith("ok")
            print(f"{target_name:24s} {kernel.__name__:22s} {status}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
