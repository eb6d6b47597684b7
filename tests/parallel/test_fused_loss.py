"""One loss component on every path: with model.kernels triton the fused, chunked linear +
cross-entropy runs in one process, under tensor parallelism (on the vocabulary shards), under
pipelining (in the last stage) and under both, and gives one process's losses and gradient
norms. Under tensor + sequence parallelism the other kernels (norms, RoPE, SwiGLU) see sharded
widths and DTensor inputs: there the Triton run also equals the PyTorch ops' run. The Triton
kernels run through the CPU interpreter here (TRITON_INTERPRET=1)."""

from __future__ import annotations

import math

from harness import first_gradient_problems, train_layouts
from multiproc import run_distributed

# Two blocks: Triton's interpreter runs every kernel call in Python on the CPU.
SMALL = {
    "train.steps": 2, "data.seq_len": 8, "train.global_batch_size": 4, "model.num_layers": 2
}  # fmt: skip
TRITON = {**SMALL, "model.kernels": "triton"}
REL = 1e-5  # fp32; only the reduction order differs between layouts


def _same(reference: dict, run: dict) -> None:
    for key in ("losses", "grad_norms"):
        assert len(run[key]) == 2
        for a, b in zip(reference[key], run[key]):
            assert math.isclose(a, b, rel_tol=REL), (key, reference[key], run[key])


def test_fused_loss_in_every_layout(tmp_path):
    (one,) = train_layouts(0, 1, [{**TRITON, "parallel.dp_shard": 1}], str(tmp_path / "one"))
    assert one["loss_fns"] == ["fused-triton"]

    two = [
        {**TRITON, "parallel.dp_shard": 1, "parallel.tp": 2},
        {**TRITON, "parallel.dp_shard": 1, "parallel.pp": 2},
        {**SMALL, "parallel.dp_shard": 1, "parallel.tp": 2, "model.kernels": "torch"},
    ]
    tp, pp, tp_torch = zip(*run_distributed(train_layouts, 2, two, str(tmp_path / "two")))
    for rank_result, torch_ops in zip(tp, tp_torch):
        assert rank_result["loss_fns"] == ["vocab-parallel-triton"]
        _same(one, rank_result)
        assert torch_ops["loss_fns"] == ["vocab-parallel-torch"]
        _same(torch_ops, rank_result)  # every kernel under tp + sp: the PyTorch ops' numbers
    assert [r["loss_fns"] for r in pp] == [[""], ["fused-triton"]]  # the last stage has it
    _same(one, pp[-1])

    four = [{**TRITON, "parallel.dp_shard": 1, "parallel.tp": 2, "parallel.pp": 2}]
    (tp_pp,) = zip(*run_distributed(train_layouts, 4, four, str(tmp_path / "four")))
    last_stage = [r for r in tp_pp if r["loss_fns"] != [""]]
    assert [r["loss_fns"] for r in last_stage] == [["vocab-parallel-triton"]] * 2
    for r in last_stage:
        _same(one, r)
    # and every parameter's own step-0 gradient (the fused loss writes d weight and d hidden)
    want = one["first_grads"]
    bad = first_gradient_problems("tp=2 triton", list(tp), want, REL)
    bad += first_gradient_problems("tp=2 torch ops", list(tp_torch), want, REL)
    bad += first_gradient_problems("pp=2 triton", list(pp), want, REL)
    bad += first_gradient_problems("tp=2 x pp=2 triton", list(tp_pp), want, REL)
    assert not bad, "\n".join(bad)
