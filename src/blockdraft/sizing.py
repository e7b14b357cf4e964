"""Sizing drafts to the hardware: verify only the tree nodes that pay for their cost.

Verifying N draft tokens costs cost(1 + N) seconds per step (the target's own cost curve,
measured once); a node is accepted with about the probability of its path under the heads,
so the step commits 1 + sum(p(node)) tokens on average. `fit_drafts` keeps the N most
probable nodes (a prefix-closed set) that maximise expected tokens per second; when no node
pays, the step sends no draft at all, like plain decoding.
"""
from __future__ import annotations

import functools
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .tree import build_tree
from .types import Lattice


@dataclass(frozen=True)
class CostCurve:
    """Seconds of one target forward for a number of input tokens (piecewise linear)."""

    tokens: tuple[int, ...]  # measured input sizes, increasing
    seconds: tuple[float, ...]
    spread: float = 0.0  # median over sizes of (p90 - p10) / median of the rounds: a busy machine shows here

    def __call__(self, n: int) -> float:
        if n >= self.tokens[-1]:  # extrapolate with the last segment's slope
            slope = (self.seconds[-1] - self.seconds[-2]) / (self.tokens[-1] - self.tokens[-2])
            return self.seconds[-1] + slope * (n - self.tokens[-1])
        return float(np.interp(n, self.tokens, self.seconds))


def measure_cost_curve(target, sizes=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), context: int = 200,
                       rounds: int = 5, progress: bool = False) -> CostCurve:
    """Time the target's forward for each size after a `context`-token prefill.

    Rounds sweep all sizes in turn, so a slow spell of a shared machine hits every size alike;
    each size keeps its median, and the curve is made non-decreasing (a bigger input never
    costs less), which keeps the fitted draft sizes stable from run to run.
    """
    vocab = target.lm_head.weight.shape[0]
    context = max(1, min(context, target.max_positions - max(sizes) - 1))
    filler = [(t * 7919 + 100) % vocab for t in range(context)]
    runs: dict[int, list[float]] = {n: [] for n in sizes}
    target.prefill(filler)  # the cost of a tree's forward does not depend on the prompt's states
    # progress: a bar on a terminal (disable=None: none elsewhere), as a first run takes seconds to minutes
    bar = tqdm(total=(rounds + 1) * len(sizes), desc="cost curve", unit="forward", leave=False,
               disable=None if progress else True)
    for round_ in range(rounds + 1):  # round 0 warms up
        for n in sizes:
            tree = build_tree(filler[-1], [filler[:n - 1]])
            began = time.perf_counter()
            target.forward(tree)
            if round_:
                runs[n].append(time.perf_counter() - began)
            target.rollback(n)  # back to the same context for the next size
            bar.update()
    bar.close()
    target.reset()
    medians = np.maximum.accumulate([float(np.median(runs[n])) for n in sizes])
    spread = float(np.median([(np.percentile(runs[n], 90) - np.percentile(runs[n], 10)) / np.median(runs[n])
                              for n in sizes]))
    return CostCurve(tuple(sizes), tuple(medians.tolist()), spread)


BUSY_SPREAD = 0.25  # a curve whose rounds spread more than this was measured on a busy machine: not cached


def cached_cost_curve(target, key: dict, folder: Path, remeasure: bool = False) -> CostCurve:
    """The cost curve for this model on this machine, measured once and kept as JSON in `folder`.

    `key` names what the curve depends on (model weights, device, dtype, threads, CPU...); a new
    key measures again (about 6 s for SmolLM2-135M here), and so does remeasure=True
    (`blockdraft calibrate`). A curve whose rounds spread widely (a busy machine) is used but not
    cached, so the next run measures again.
    """
    name = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(folder) / f"cost-curve-{name}.json"
    if not remeasure:
        try:
            saved = json.loads(path.read_text())
            return CostCurve(tuple(saved["tokens"]), tuple(saved["seconds"]), float(saved.get("spread", 0.0)))
        except (OSError, ValueError, KeyError, TypeError):
            pass
        print(f"[blockdraft] first sized draft for this model and machine: measuring the forward-cost curve once "
              f"(seconds to minutes on a busy CPU), cached in {path}", file=sys.stderr, flush=True)
    curve = measure_cost_curve(target, progress=True)
    if curve.spread > BUSY_SPREAD:
        print(f"[blockdraft] the cost curve's rounds spread {curve.spread:.0%} (a busy machine?): used now, "
              "not cached; `blockdraft calibrate` on a quiet machine keeps one", file=sys.stderr, flush=True)
        return curve
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "tokens": curve.tokens, "seconds": curve.seconds,
                                    "spread": curve.spread}, indent=1) + "\n")
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time
    return curve


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
    kept = {path for path, _ in ranked[:profitable_nodes([p for _, p in ranked], cost)]}
    fitted = []
    for draft in drafts:
        cut = 0
        while cut < len(draft) and tuple(draft[: cut + 1]) in kept:
            cut += 1
        if cut and draft[:cut] not in fitted:
            fitted.append(draft[:cut])
    return fitted


def profitable_nodes(probs: list[float], cost: CostCurve) -> int:
    """How many of the tree nodes (most probable first, each with its chance of being accepted)
    maximise expected tokens per forward second: (1 + sum of the first n chances) / cost(1 + n)."""
    best_n, best_rate = 0, float("-inf")
    for n, rate in enumerate(_rates(probs, cost_table(cost, len(probs) + 1))):
        if rate > best_rate:
            best_n, best_rate = n, rate
    return best_n


def more_nodes_could_pay(probs: list[float], p: float, cost: CostCurve, limit: int) -> bool:
    """Whether nodes of chance at most `p`, ranked after `probs` (most probable first), could make
    some count up to `limit` beat the best rate of `probs`' own prefixes: the bound a tree grower
    checks before a deeper level, whose nodes are never likelier than p."""
    seconds = cost_table(cost, limit + 1)
    best_rate, gain, a = max(_rates(probs, seconds)), sum(probs), len(probs)
    return any((1.0 + gain + (n - a) * p) / seconds[n] > best_rate for n in range(a + 1, limit + 1))


def _rates(probs: list[float], seconds: tuple[float, ...]):
    """Expected tokens per forward second, (1 + sum of the first n chances) / cost(1 + n), for
    n = 0 .. len(probs); seconds[i] is cost(1 + i)."""
    gain = 0.0
    yield 1.0 / seconds[0]
    for n, p in enumerate(probs, start=1):
        gain += p
        yield (1.0 + gain) / seconds[n]


@functools.lru_cache(maxsize=64)
def _cost_table(cost: CostCurve, size: int) -> tuple[float, ...]:
    return tuple(cost(n) for n in range(1, size + 1))


def cost_table(cost: CostCurve, n: int) -> tuple[float, ...]:
    """cost(1), ..., cost(n) or more, computed once per curve: drafters size a tree every step, and
    interpolating each size again cost more than the sizing itself."""
    return _cost_table(cost, max(64, 1 << max(0, n - 1).bit_length()))


class FittedRefiner:
    """Wraps any refiner: its drafts, trimmed to what the hardware verifies profitably."""

    def __init__(self, inner, cost: CostCurve):
        self.inner, self.cost = inner, cost

    def refine(self, lattice: Lattice | None, context: list[int]) -> list[list[int]]:
        if lattice is None:  # no head scores to size by (the drafter stopped before its first head)
            return []
        return fit_drafts(self.inner.refine(lattice, context), lattice, self.cost)

    def accept(self, context: list[int]) -> None:
        self.inner.accept(context)
