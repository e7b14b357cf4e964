"""Learning-rate schedule and step budget shared by the head, eagle and rescorer trainers."""
from __future__ import annotations

import math
import time
from typing import Callable


class StepPlan:
    """Warm-up + cosine over `total` steps; with max_seconds, total shrinks to fit the budget.

    The steady step time is first measured between steps 10 and 30, so one-off start-up costs
    (GPU kernels, allocator warm-up) do not shrink the plan (they did in an earlier version).
    It is measured again over every `recheck` steps after that, and the plan shrinks (never
    grows) to what the time left allows at the latest rate: steps that slow down midway (a CPU
    shared with another job) end the run near its budget instead of past it. Past the warm-up,
    shrinking only moves the cosine further along, so the learning rate never rises (a shrink
    at step 30 may end a long warm-up early).
    """

    def __init__(self, total: int, max_seconds: float = 0.0, warmup: float = 0.05, recheck: int = 50,
                 clock: Callable[[], float] = time.time):
        self.total, self.max_seconds, self.warmup, self.recheck = max(1, total), max_seconds, warmup, recheck
        self._clock = clock
        self._began = clock()
        self._mark: tuple[int, float] | None = None  # (steps done, time) where the current window began

    def lr_factor(self, step: int) -> float:
        warm = max(1, int(self.warmup * self.total))
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, self.total - warm))))

    def tick(self, done: int) -> None:
        """Call after each optimiser step (done = steps so far in this run)."""
        if not self.max_seconds:
            return
        now = self._clock()
        if done == 10:
            self._mark = (done, now)
            return
        if self._mark is None:
            return
        start, began = self._mark
        if done - start != (20 if start == 10 else self.recheck):  # steps 10-30 first, then every `recheck`
            return
        per_step = (now - began) / (done - start)
        if per_step > 0:
            left = self.max_seconds - (now - self._began)
            self.total = min(self.total, done + max(0, int(left / per_step)))
        self._mark = (done, now)

    def finished(self, done: int) -> bool:
        return done >= self.total
