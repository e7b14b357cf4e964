"""Sizing drafts to the hardware: verify only the tree nodes that pay for their cost.

Verifying N draft tokens costs cost(1 + N) seconds per step (the target's own cost curve,
measured once); a node is accepted with about the probability of its path under the heads,
so the step commits 1 + sum(p(node)) tokens on average. `fit_drafts` keeps the N most
probable nodes (a prefix-closed set) that maximise expected tokens per second; when no node
pays, the step sends no draft at all, like plain decoding.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .tree import build_tree
from .types import Lattice


@dataclass(frozen=True)
class CostCurve:
    """Seconds of one target forward for a number of input tokens (piecewise linear)."""

    tokens: tuple[int, ...]  # measured input sizes, increasing
    seconds: tuple[float, ...]

    def __call__(self, n: int) -> float:
        if n >= self.tokens[-1]:  # extrapolate with the last segment's slope
            slope = (self.seconds[-1] - self.seconds[-2]) / (self.tokens[-1] - self.tokens[-2])
            return self.seconds[-1] + slope * (n - self.tokens[-1])
        return float(np.interp(n, self.tokens, self.seconds))


def measure_cost_curve(target, sizes=(1, 2, 4, 8, 16, 32), context: int = 200, reps: int = 3) -> CostCurve:
    """Time the target's forward for each size after a `context`-token prefill (median of reps)."""
    filler = [int(t) % 1000 + 100 for t in range(context)]
    seconds = []
    for n in sizes:
        runs = []
        for _ in range(reps):
            target.prefill(filler)
            tree = build_tree(filler[-1], [filler[:n - 1]])
            began = time.perf_counter()
            target.forward(tree)
            runs.append(time.perf_counter() - began)
        seconds.append(sorted(runs)[reps // 2])
    target.reset()
    return CostCurve(tuple(sizes), tuple(seconds))


def fit_drafts(drafts: list[list[int]], lattice: Lattice, cost: CostCurve) -> list[list[int]]:
    """Trim drafts to the most probable prefix-closed node set that maximises tokens per second.

    Example: one draft [a, b] with head probabilities 0.9 and 0.2 -> node probs 0.9, 0.18.
    With cost(1)=1, cost(2)=1.5, cost(3)=1.55: 1/1 = 1.0, (1+0.9)/1.5 = 1.27,
    (1+1.08)/1.55 = 1.34, so both nodes are kept; with p(a)=0.3 none is.
    """
    probs = np.exp(lattice.logprobs.double().numpy())  # [K, k]
    rows = [dict(zip(lattice.tokens[j].tolist(), probs[j].tolist())) for j in range(lattice.depth)]
    nodes: dict[tuple[int, ...], float] = {}
    for draft in drafts:
        p = 1.0
        for j, token in enumerate(draft):
            p *= rows[j].get(token, 0.0) if j < len(rows) else 0.0
            nodes.setdefault(tuple(draft[: j + 1]), p)
    ranked = sorted(nodes.items(), key=lambda kv: (-kv[1], len(kv[0])))  # parents first on ties
    best_n, best_rate, gain = 0, 1.0 / cost(1), 0.0
    for n, (_, p) in enumerate(ranked, start=1):
        gain += p
        rate = (1.0 + gain) / cost(1 + n)
        if rate > best_rate:
            best_n, best_rate = n, rate
    kept = {path for path, _ in ranked[:best_n]}
    fitted = []
    for draft in drafts:
        cut = 0
        while cut < len(draft) and tuple(draft[: cut + 1]) in kept:
            cut += 1
        if cut and draft[:cut] not in fitted:
            fitted.append(draft[:cut])
    return fitted


class FittedRefiner:
    """Wraps any refiner: its drafts, trimmed to what the hardware verifies profitably."""

    def __init__(self, inner, cost: CostCurve):
        self.inner, self.cost = inner, cost

    def refine(self, lattice: Lattice, context: list[int]) -> list[list[int]]:
        return fit_drafts(self.inner.refine(lattice, context), lattice, self.cost)

    def accept(self, context: list[int]) -> None:
        self.inner.accept(context)
