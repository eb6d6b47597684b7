"""Measure what a real training step allocates, per rank, on CPU.

Method: PyTorch's profiler with ``profile_memory=True`` records every allocation and free of
the CPU allocator (size and time), including the temporaries inside kernels. The engine (the
real eurotrain engine: FSDP2, DDP, DeepSpeed, TP, PP, AC as the config says) runs two optimizer
steps under it and the second is measured: the tensor storages Python reaches between the two
(the persistent state), plus the running sum of the second step's events on top of them.
"""

from __future__ import annotations

import gc
import warnings
from typing import Any

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function


def _trace(prof: Any) -> tuple[list[tuple[int, int, int]], dict[str, tuple[int, int]]]:
    """(allocation events (time ns, +/- bytes, address) by time, {range name: (start, end)})."""
    events: list[tuple[int, int, int]] = []
    ranges: dict[str, tuple[int, int]] = {}
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            if node.extra_fields.device.type == "cpu":
                fields = node.extra_fields
                events.append((node.start_time_ns, fields.alloc_size, fields.ptr))
        elif node.name.startswith("memtrace:"):
            ranges[node.name] = (node.start_time_ns, node.end_time_ns)
        stack.extend(node.children)
    events.sort()
    return events, ranges


def live_storages(exclude: set[int] = frozenset()) -> dict[int, int]:  # type: ignore[assignment]
    """{data pointer: bytes} of every CPU tensor storage Python can reach (DTensors by their
    local tensors), each storage once; ``exclude``: storages (data pointers) to leave out."""
    storages: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance() on deprecated module attributes warns
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        if obj.is_meta or obj.device.type != "cpu":
            continue
        local = getattr(obj, "_local_tensor", obj)
        try:
            storage = local.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
            continue
        if storage.data_ptr() and storage.data_ptr() not in exclude:
            storages[storage.data_ptr()] = max(
                storages.get(storage.data_ptr(), 0), storage.nbytes()
            )
    return storages


def measure_step(cfg: Any, world_size: int) -> dict[str, int]:
    """Bytes this rank holds at the start of a training step (the persistent state) and at the
    peak of the step. ``cfg`` is a eurotrain Config; the process group (if any) is up.

    The profiler (allocation events) covers two steps, and the second is measured: the first
    creates the optimizer state and the pipeline's buffers, as in the steady state of a long
    run (under DDP, replicas only, one more step runs before: DDP rebuilds its gradient buckets
    in its second step, a new set allocated and the old one freed). Between the two, every
    tensor storage Python can reach is counted directly: the persistent bytes. The events of the
    second step then give the bytes allocated on top of them at every moment, and its frees of
    what the first allocated are seen: the profiler records no free of a block allocated before
    it started, so buffers a step replaces (DeepSpeed's gradient buckets, the pipeline's local
    hand-offs) would otherwise count twice. (It also misses frees made on gloo's worker
    threads: within one step a few blocks of communication buffers.)
    """
    from eurotrain.data import Batch
    from eurotrain.parallel.checks import check_layout
    from eurotrain.parallel.engine import build_engine
    from eurotrain.parallel.parallelize import uses_ddp

    dims = check_layout(cfg, world_size, cuda=False)
    t = cfg.train
    local = t.global_batch_size // dims.dp
    micro = [t.micro_batch_size] * (local // t.micro_batch_size)
    gen = torch.Generator().manual_seed(0)
    seq = cfg.data.seq_len
    tokens = float(t.global_batch_size * seq)

    def batch() -> Batch:
        xs = [torch.randint(0, cfg.model.vocab_size, (b, seq), generator=gen) for b in micro]
        ys = [torch.randint(0, cfg.model.vocab_size, (b, seq), generator=gen) for b in micro]
        return Batch(xs, ys, num_tokens=sum(b * seq for b in micro))

    mesh = dims.build_mesh("cpu") if world_size > 1 else None
    engine = build_engine(cfg, dims, mesh, torch.device("cpu"))

    def step(b: Batch, engine: Any) -> None:
        loss = engine.reduce_loss(engine.forward_backward(b, tokens)) / tokens
        engine.step(t.grad_clip, loss)

    for _ in range(1 if uses_ddp(dims, mesh, cfg.parallel) else 0):
        step(batch(), engine)
    before, measured = batch(), batch()  # the data loader's tensors, not the model's: not counted
    data = {x.untyped_storage().data_ptr() for b in (before, measured)
            for x in [*b.inputs, *b.labels]}  # fmt: skip
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("memtrace:before"):
            step(before, engine)
        gc.collect()
        alive = live_storages(exclude=data)
        persistent = sum(alive.values())
        with record_function("memtrace:step"):
            step(measured, engine)
    events, ranges = _trace(prof)
    start = ranges["memtrace:step"][0]
    blocks: dict[int, int] = {}
    live = peak = 0
    measuring = False
    for time_ns, size, address in events:
        if not measuring and time_ns >= start:
            # what the first step allocated and Python no longer reaches was freed, seen or
            # not (on a gloo thread): forget it, lest a reused address count as a free
            blocks = {a: n for a, n in blocks.items() if a in alive}
            live, measuring = 0, True
        if size > 0:
            # a block still recorded at this address was freed unseen (on a gloo thread)
            live += size - blocks.pop(address, 0)
            blocks[address] = size
        else:  # frees of blocks allocated before the trace are not recorded (sizes unknown)
            live -= blocks.pop(address, 0)
        if measuring:
            peak = max(peak, live)
    del engine
    gc.collect()
    return {"persistent": persistent, "peak": persistent + peak}
