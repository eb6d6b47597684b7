"""How the Llama model may be split by tensor parallelism: the plan as data, next to the model.

eurotrain/parallel/tp.py applies it with ``parallelize_module``; the model itself never sees a
mesh. Column-parallel q/k/v and w1/w3 split heads and the MLP hidden size, row-parallel wo/w2
reduce back; the model reads its local head count from the weight shapes, so GQA splits
correctly whenever tp divides the KV heads. With sequence parallelism the norms and residual
stream are split along the sequence between the blocks (all-gather in, reduce-scatter out).
The output projection stays split over the vocabulary (loss parallel: the cross-entropy is
computed on the vocabulary shards without gathering the logits). Qwen3's per-head q/k norms
see each rank's heads: their weights are replicated and their gradients summed over the tp ranks
(DTensor inputs sharded on the head dim). Entries for modules a block does not have (q/k norms,
biases are part of their Linear) are skipped by the code that applies the plan.
"""

from __future__ import annotations

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

TPPlan = dict[str, ParallelStyle]
"""Module path (relative to where it is applied) -> how parallelize_module splits it."""


def llama_tp_plan(sequence_parallel: bool) -> tuple[TPPlan, TPPlan]:
    """(plan for the model's top level, plan for each TransformerBlock; entries whose module a
    block does not have are to be skipped)."""
    # Between blocks the residual stream is sharded on the sequence dim (SP) or replicated.
    between = Shard(1) if sequence_parallel else Replicate()
    top: TPPlan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=between),
        "output": ColwiseParallel(
            input_layouts=between, output_layouts=Shard(-1), use_local_output=False
        ),
    }
    block: TPPlan = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=between),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=between),
        # [B, S, heads of this rank, head_dim]: the norm weight's gradient is a sum over all heads.
        "attention.q_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
        "attention.k_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
    }
    if sequence_parallel:
        top["norm"] = SequenceParallel()
        block["attention_norm"] = SequenceParallel()
        block["ffn_norm"] = SequenceParallel()
        # attention(x, cos, sin, mask): gather x along the sequence; the rest stays plain.
        block["attention"] = PrepareModuleInput(
            input_layouts=(Shard(1), None, None, None),
            desired_input_layouts=(Replicate(), None, None, None),
        )
        block["feed_forward"] = PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
        )
    return top, block
