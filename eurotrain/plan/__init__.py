"""``eurotrain plan``: from a model, a machine and a token budget to a layout that fits, its
speed, days and node-hours.

The planner is a cost model of what eurotrain's own code does (docs/planner.md):

- ``shapes``: the parameter tensors each rank holds under tensor, pipeline and FSDP sharding;
- ``activations``: the tensors autograd saves per block (by kernel set, precision, sequence and
  context parallelism, activation checkpointing) and the loss's buffers;
- ``moe``: a mixture-of-experts block's activations and expert parallelism's all-to-alls;
- ``memory``: bytes per GPU for one layout (parameters, gradients, optimizer state,
  activations in flight per pipeline schedule, FSDP and pipeline buffers, allocator allowance);
- ``hardware`` and ``calibrate``: device peaks, bandwidths and achieved efficiencies, by
  default from published figures, replaced by ``eurotrain bench`` measurements;
- ``speed``: step time from FLOPs, communication and pipeline bubbles;
- ``layouts``: the candidate layouts that pass ``check_layout``;
- ``report`` and ``cli``: the ranked table, the recommendation and the command line.
"""
