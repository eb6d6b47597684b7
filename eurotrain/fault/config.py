"""The ``fault:`` section: how a run survives dead ranks, hangs, loss spikes and slow nodes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from eurotrain.errors import ConfigError

GPU_MTBF_HOURS = 50_700.0
"""Mean time between failures of one GPU (with its share of host, network and software), from
Llama 3's pre-training: 419 unexpected interruptions in 54 days on 16,384 GPUs (Dubey et al.,
2024, "The Llama 3 Herd of Models", section 3.3.4), i.e. one every ~3.1 hours at that size."""


@dataclass
class FaultConfig:
    """Failures of a rank, a node, the network or the numerics: what the run does about them."""

    collective_timeout_s: float = 240.0
    """Seconds a collective (all-reduce, broadcast, barrier, ...) waits for the other ranks
    before the run stops with an error naming the ranks (and hosts) that stopped answering.
    Keep it above the longest pause one rank can take alone (a slow step, loading a batch, a
    synchronous checkpoint) and well below the walltime warning (``--signal-seconds``). Under
    NCCL, PyTorch's watchdog ends the ranks at this timeout. The default, 240 s, is below the
    launcher's 300 s walltime warning, so a hang near the end of a job is caught and restarted
    before SLURM ends it; raise both together for a start-up slower than that."""
    max_restarts: int = 3
    """Restarts inside one job (``eurotrain launch`` scripts): when the ranks fail (a crash, a
    lost node, a hang the watchdog caught), the job starts them again from the last committed
    checkpoint, up to this many times, without waiting in the queue; a failing node is left out
    when the allocation has spare nodes (``--spare-nodes``). 0: no restart."""
    hang_timeout_s: float = 0.0
    """Seconds without progress (no step started or finished) before a rank's watchdog calls it
    a hang: every rank still running writes the stacks of all its threads to RUN_DIR/hangs/,
    the log names the ranks (and hosts) that stopped, and the ranks exit with code 3 so that
    the job restarts them. 0: automatic (hang_step_multiple x the slowest step so far, at least
    hang_min_s; collective_timeout_s until the first step is over). -1: no watchdog."""
    hang_min_s: float = 300.0
    """The floor of the automatic hang timeout (seconds)."""
    hang_step_multiple: float = 10.0
    """The automatic hang timeout in units of the slowest step (and pause between steps: a
    checkpoint, an evaluation) seen so far."""
    anomaly_policy: Literal["skip", "rollback", "stop"] = "skip"
    """What a non-finite loss or gradient norm, or a spike (below), does. Its update is always
    skipped on the device; the host learns of it at the next log step and then: skip: goes on
    (non-finite steps up to train.max_nonfinite_steps, then stops); rollback: reloads the last
    checkpoint from before it, skips the data since that checkpoint up to and including the
    step's batch (recorded in RUN_DIR/skipped_windows.json, honoured on resume), at most
    max_rollbacks times; stop: stops with an error."""
    spike_zscore: float = 0.0
    """A loss above its running mean by more than this many running standard deviations is a
    spike (e.g. 6); 0: no loss-spike detection."""
    grad_spike_zscore: float = 0.0
    """The same for the gradient norm (before clipping); 0: off. DeepSpeed computes the norm
    inside its update, so there only the loss is checked before the update."""
    spike_window: int = 100
    """Steps in the running mean and variance (an exponential average with this span); spike
    checks start once this many steps were seen."""
    max_rollbacks: int = 3
    """Rollbacks per run (anomaly_policy rollback); one more anomaly stops the run."""
    straggler_margin: float = 0.2
    """At each log step every rank's compute time per step is compared with the median over
    ranks: ranks slower by more than this fraction are named, with their hosts, in the log and
    in metrics.jsonl ("stragglers"). 0: no straggler check."""
    mtbf_hours: float = 0.0
    """Mean time between failures of the whole job, for checkpoint.interval auto. 0: the GPU
    count at Llama 3's failure rate (one failure per ~50,700 GPU-hours); `eurotrain launch`
    sets it from the cluster profile's node_mtbf_hours / nodes."""

    def __post_init__(self) -> None:
        _positive("collective_timeout_s", self.collective_timeout_s, "the default is 240")
        _positive("hang_min_s", self.hang_min_s, "the default is 300")
        _positive("hang_step_multiple", self.hang_step_multiple, "the default is 10")
        if not (self.hang_timeout_s in (0, -1) or _finite_above_zero(self.hang_timeout_s)):
            raise ConfigError(
                f"fault.hang_timeout_s: {self.hang_timeout_s} must be seconds > 0, 0 (automatic) "
                f"or -1 (no watchdog)"
            )
        for key in ("max_restarts", "max_rollbacks"):
            if getattr(self, key) < 0:
                raise ConfigError(f"fault.{key}: {getattr(self, key)} must be >= 0 (0 = none)")
        if self.anomaly_policy not in ("skip", "rollback", "stop"):
            raise ConfigError(
                f"fault.anomaly_policy: {self.anomaly_policy!r} must be skip, rollback or stop"
            )
        for key in ("spike_zscore", "grad_spike_zscore", "straggler_margin", "mtbf_hours"):
            value = getattr(self, key)
            if not (value == 0 or _finite_above_zero(value)):
                raise ConfigError(f"fault.{key}: {value} must be > 0, or 0 to turn it off")
        if self.spike_window < 2:
            raise ConfigError(
                f"fault.spike_window: {self.spike_window} must be >= 2 steps (e.g. 100)"
            )

    @property
    def detects_spikes(self) -> bool:
        return bool(self.spike_zscore or self.grad_spike_zscore)

    @property
    def watchdog(self) -> bool:
        return self.hang_timeout_s != -1


def _finite_above_zero(value: float) -> bool:
    return value > 0 and math.isfinite(value)


def _positive(key: str, value: float, hint: str) -> None:
    if not _finite_above_zero(value):
        raise ConfigError(f"fault.{key}: {value} must be > 0 ({hint})")
