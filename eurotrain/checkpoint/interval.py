"""``checkpoint.interval: auto``: how often to save, from what a save costs and how often the job
fails (Young 1974, Daly 2006).

With a save stalling training for ``stall`` seconds and failures ``mtbf`` seconds apart on
average, the expected time lost per unit of time is about stall / T + T / (2 mtbf) for saves T
seconds apart; Daly's first-order optimum is

    T = sqrt(2 * stall * mtbf) - stall      (stall < mtbf / 2; else T = mtbf)

The stall is measured at each save (the training thread's pause: staging, and waiting for a save
still in flight), the step time between saves, both on the host and agreed as the maximum over
ranks; the interval in steps is T / step time. Until a first save is measured, the first save
comes ``FIRST_SAVE_STEPS`` steps into the run. The choice and its inputs are logged whenever it
changes by more than a fifth, and kept in checkpoints (a resumed run starts from them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

FIRST_SAVE_STEPS = 10


def young_daly(stall_s: float, mtbf_s: float) -> float:
    """Seconds between saves that minimise the expected loss (Daly's first-order formula)."""
    if stall_s <= 0:
        return 0.0
    if stall_s >= mtbf_s / 2:
        return mtbf_s
    return math.sqrt(2 * stall_s * mtbf_s) - stall_s


@dataclass
class AutoInterval:
    """The next step to save at; ``measured`` after each save moves it."""

    mtbf_s: float
    max_steps: int
    stall_s: float = 0.0
    step_s: float = 0.0
    every: int = 0
    """Steps between saves (0 until measured)."""
    next_step: int = 0

    def start(self, step: int) -> None:
        self.next_step = step + (self.every or FIRST_SAVE_STEPS)

    def due(self, step: int) -> bool:
        return step >= self.next_step

    def measured(self, step: int, stall_s: float, step_s: float) -> str | None:
        """Take a save's stall and the step time since the previous save (max over ranks);
        returns a line to log when the interval changed noticeably."""
        # The newest measurement counts most, but one slow save does not swing it alone.
        self.stall_s = stall_s if not self.stall_s else 0.5 * (self.stall_s + stall_s)
        if step_s > 0:
            self.step_s = step_s if not self.step_s else 0.5 * (self.step_s + step_s)
        before = self.every
        seconds = young_daly(self.stall_s, self.mtbf_s)
        steps = seconds / self.step_s if self.step_s > 0 else FIRST_SAVE_STEPS
        self.every = max(1, min(self.max_steps, round(steps)))
        self.next_step = step + self.every
        if before and abs(self.every - before) <= 0.2 * before:
            return None
        return (
            f"checkpoint.interval auto: every {self.every} steps (~{seconds / 60:.1f} min): "
            f"save stall {self.stall_s:.3g} s, step {self.step_s:.3g} s, MTBF "
            f"{self.mtbf_s / 3600:.4g} h -> Young/Daly sqrt(2 x stall x MTBF) - stall = "
            f"{seconds:.4g} s"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"stall_s": self.stall_s, "step_s": self.step_s, "every": self.every}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stall_s = float(state["stall_s"])
        self.step_s = float(state["step_s"])
        self.every = int(state["every"])
