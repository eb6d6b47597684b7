"""Keeping a weeks-long run alive: the ``fault:`` config section and the callbacks that act on
failures. One module per concern:

    config.py     FaultConfig (every key documented and checked)
    signals.py    the stop signal: SIGUSR1/SIGTERM on any rank stops every rank after one step
    peers.py      PeerWatch: a failed collective names the ranks (and hosts) that stopped answering
    watchdog.py   HangWatchdog: no progress for fault.hang_timeout_s -> stacks, names, exit 3
    anomalies.py  AnomalyGuard: non-finite and spiking steps -> skip, rollback or stop
    stragglers.py Stragglers: ranks slower than the median, named at log steps
    inject.py     fault injection for tests (environment variables; inert otherwise)

Job chains and in-allocation restarts live in the job script (eurotrain/chain.py); the time
accounting in eurotrain/goodput.py.
"""

from eurotrain.fault.config import FaultConfig
from eurotrain.fault.inject import FREEZE_HOOK
from eurotrain.fault.peers import PeerWatch, _ranks, is_collective_failure, node_name
from eurotrain.fault.signals import StopOnSignal, StopRequest

__all__ = [
    "FREEZE_HOOK",
    "FaultConfig",
    "PeerWatch",
    "StopOnSignal",
    "StopRequest",
    "_ranks",
    "is_collective_failure",
    "node_name",
]
