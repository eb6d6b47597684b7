"""Between log steps a training step never makes the host read a tensor (on a GPU each read
waits for the device): no .item(), .tolist(), .numpy(), .cpu(), bool()/float()/int() of a
tensor, no torch.cuda.synchronize(). Loss, gradient norm and the non-finite flag stay on the
device until the log step; the token count and the stop flag are agreed on the host.

Counted with a TorchFunctionMode that sees every such call made from Python, whatever the
tensor's device; on a GPU machine the same run is also checked with
torch.cuda.set_sync_debug_mode("error")."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from checkpoint.ckpt_common import tiny_config
from multiproc import run_distributed
from torch.overrides import TorchFunctionMode

READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
}


class CountHostReads(TorchFunctionMode):
    """Records every tensor read by the host, with where it came from."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            where = traceback.extract_stack(limit=4)[0]
            self.reads.append(f"{func.__name__} at {where.filename}:{where.lineno}")
        return func(*args, **(kwargs or {}))


class PerStep:
    """A callback that counts the host reads of each step (on_step_start .. on_step_end)."""

    def __init__(self) -> None:
        self.mode: CountHostReads | None = None
        self.reads: dict[int, list[str]] = {}
        self.log_steps: set[int] = set()

    def on_step_start(self, trainer, step):
        self.mode = CountHostReads()
        self.mode.__enter__()

    def on_step_end(self, trainer, step, metrics):
        assert self.mode is not None
        self.mode.__exit__(None, None, None)
        self.reads[step] = self.mode.reads
        if trainer.is_log_step(step):
            self.log_steps.add(step)


def run(rank: int, world: int, out: str, parallel: dict) -> tuple[dict, set, list[float]]:
    from eurotrain.train import Trainer

    cfg = tiny_config(Path(out), f"syncs{world}", 8, parallel=parallel, logging={"log_interval": 4})
    counter = PerStep()
    syncs = []
    real_sync = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *a, **k: syncs.append(1) or real_sync(*a, **k)
    try:
        result = Trainer(cfg, callbacks=[counter]).train()
    finally:
        torch.cuda.synchronize = real_sync
    assert not syncs, f"torch.cuda.synchronize called {len(syncs)} times"
    return counter.reads, counter.log_steps, result.losses


def _check(reads: dict, log_steps: set, losses: list, warmup: int = 0) -> None:
    """``warmup``: first steps allowed one-time set-up reads (the pipeline schedule exchanges
    its stages' shapes as Python objects on its first step)."""
    assert log_steps == {4, 8}
    assert len(losses) == 8  # every step's loss still reaches the result, in bulk
    for step, calls in reads.items():
        if step not in log_steps and step > warmup:
            assert calls == [], f"step {step} read tensors on the host: {calls}"


def test_one_process_reads_nothing_between_log_steps(tmp_path):
    _check(*run(0, 1, str(tmp_path), {}))


@pytest.mark.parametrize(
    "parallel", [{"dp_shard": 2}, {"pp": 2, "dp_shard": 1}], ids=["fsdp", "pipeline"]
)
def test_two_ranks_read_nothing_between_log_steps(tmp_path, parallel):
    warmup = 1 if "pp" in parallel else 0
    for reads, log_steps, losses in run_distributed(run, 2, str(tmp_path), parallel):
        _check(reads, log_steps, losses, warmup)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_step_has_no_device_sync(tmp_path):
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call raises
    try:
        cfg = tiny_config(tmp_path, "gpu", 3, train={"device": "cuda"}, logging={"log_interval": 3})
        from eurotrain.train import Trainer

        trainer = Trainer(cfg)
        trainer.resume()
        for _ in range(2):  # steps 1 and 2 are not log steps
            trainer.train_step(next(trainer.loader))
    finally:
        torch.cuda.set_sync_debug_mode("default")
