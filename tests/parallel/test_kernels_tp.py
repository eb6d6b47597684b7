"""Fused kernels under tensor + sequence parallelism: the same numbers as the PyTorch ops.

Under TP the kernels see TP-sharded widths (local heads, a slice of the SwiGLU hidden size);
under sequence parallelism the norms see DTensor inputs and run the DTensor-aware reference.
The kernels run through Triton's CPU interpreter here (TRITON_INTERPRET=1, set by conftest).
"""

from __future__ import annotations

import math

from harness import train_layouts
from multiproc import run_distributed

SMALL = {"train.steps": 2, "data.seq_len": 16, "train.global_batch_size": 4}


def test_tp_sp_with_triton_kernels_matches_torch_ops(tmp_path):
    layouts = [
        {**SMALL, "parallel.dp_shard": 1, "parallel.tp": 2, "model.kernels": kernels}
        for kernels in ("torch", "triton")
    ]
    per_rank = run_distributed(train_layouts, 2, layouts, str(tmp_path))
    for torch_run, triton_run in per_rank:
        for key in ("losses", "grad_norms"):
            assert len(torch_run[key]) == 2
            for a, b in zip(torch_run[key], triton_run[key]):
                assert math.isclose(a, b, rel_tol=1e-5), (key, torch_run[key], triton_run[key])
