"""Learning-rate schedule and step budget shared by the head and rescorer trainers."""
from __future__ import annotations

import math
import time


class StepPlan:
    """Warm-up + cosine over `total` steps; with max_seconds, total shrinks to fit the budget.

    The steady step time is measured between steps 10 and 30, so one-off start-up costs (GPU
    kernels, allocator warm-up) do not shrink the plan (they did in an earlier version).
    """

    def __init__(self, total: int, max_seconds: float = 0.0, warmup: float = 0.05):
        self.total, self.max_seconds, self.warmup = max(1, total), max_seconds, warmup
        self._began = time.time()
        self._t10: float | None = None

    def lr_factor(self, step: int) -> float:
        warm = max(1, int(self.warmup * self.total))
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, self.total - warm))))

    def tick(self, done: int) -> None:
        """Call after each optimiser step (done = steps so far in this run)."""
        if not self.max_seconds:
            return
        if done == 10:
            self._t10 = time.time()
        elif done == 30 and self._t10 is not None:
            per_step = (time.time() - self._t10) / 20
            left = self.max_seconds - (time.time() - self._began)
            self.total = min(self.total, done + max(0, int(left / per_step)))

    def finished(self, done: int) -> bool:
        return done >= self.total
