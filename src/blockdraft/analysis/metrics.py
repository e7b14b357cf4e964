"""Pure draft-analysis metrics of Kim et al. 2024 (arXiv 2404.09221, sections 4-5), on plain lists/arrays.

Alignment used throughout (it mirrors blockdraft.engine): a decoding step that begins with `o`
tokens of the answer `out` already committed verifies a draft whose position i (1-based, drafted
by head i) is a guess for out[o + i - 1]. "No data" is reported as NaN, never as 0.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def run_lengths(draft: Sequence[int]) -> list[int]:
    """Lengths of the maximal runs of one repeated token.

        >>> run_lengths([5, 5, 7])
        [2, 1]
    """
    runs: list[int] = []
    for i, token in enumerate(draft):
        if i and token == draft[i - 1]:
            runs[-1] += 1
        else:
            runs.append(1)
    return runs


def consecutive_repeat_rate(drafts: Sequence[Sequence[int]]) -> float:
    """Share (0..1) of adjacent token pairs, pooled over all drafts, that repeat the same token.

    The paper's "% consec": heads that ignore each other's choices repeat tokens.
        >>> consecutive_repeat_rate([[1, 1, 2, 2], [3, 4]])   # pairs: 11 12 22 | 34 -> 2 of 4
        0.5

    NaN when no draft has two tokens.
    """
    pairs = sum(max(len(d) - 1, 0) for d in drafts)
    repeats = sum(len(d) - len(run_lengths(d)) for d in drafts)
    return repeats / pairs if pairs else math.nan


def max_run_mean(drafts: Sequence[Sequence[int]]) -> float:
    """Mean over (non-empty) drafts of the longest run of one repeated token (1 = no repeat).

        >>> max_run_mean([[7, 7, 7, 1], [1, 2, 3, 4]])   # (3 + 1) / 2
        2.0

    NaN when there is no non-empty draft.
    """
    longest = [max(run_lengths(d)) for d in drafts if len(d)]
    return float(np.mean(longest)) if longest else math.nan


def repetition_of_drafts(drafts: Sequence[Sequence[int] | None]) -> dict:
    """Repetition summary of ANY method's drafts (None / empty entries, e.g. step 0, are skipped).

        >>> repetition_of_drafts([None, [1, 1, 2, 2], [3, 4]])
        {'consec_pct': 50.0, 'max_run_mean': 1.5, 'drafts': 2, 'pairs': 4}
    """
    kept = [list(d) for d in drafts if d]
    return {"consec_pct": 100.0 * consecutive_repeat_rate(kept), "max_run_mean": max_run_mean(kept),
            "drafts": len(kept), "pairs": sum(len(d) - 1 for d in kept)}


def head_entropy_summary(entropies: np.ndarray) -> dict:
    """Per-head entropy (nats) statistics over steps: entropies [S, K] -> lists of length K.

    Head confidence falls with the head index (paper Fig. 2a); quantiles show the spread.
        >>> s = head_entropy_summary(np.array([[0.0, 1.0], [2.0, 3.0]]))
        >>> s["mean"], s["quantiles"]["q50"], s["steps"]
        ([1.0, 2.0], [1.0, 2.0], 2)
    """
    entropies = np.asarray(entropies, dtype=float)  # [S, K]
    if entropies.ndim != 2:
        raise ValueError(f"entropies must be [steps, heads], got shape {entropies.shape}")
    steps, heads = entropies.shape
    if steps == 0:
        nan = [math.nan] * heads
        return {"mean": nan, "std": nan, "quantiles": {f"q{round(q * 100)}": nan for q in QUANTILES}, "steps": 0}
    qs = np.quantile(entropies, QUANTILES, axis=0)  # [Q, K]
    return {"mean": entropies.mean(0).tolist(), "std": entropies.std(0).tolist(),
            "quantiles": {f"q{round(q * 100)}": row.tolist() for q, row in zip(QUANTILES, qs)}, "steps": steps}


def h_max(mean_entropy_per_head: Sequence[float]) -> int:
    """1-based index of the last draft head up to which mean entropy rises strictly; 1 if it falls at once.

        >>> h_max([1.0, 2.0, 3.0, 2.5, 4.0])
        3
        >>> h_max([2.0, 1.0, 3.0])
        1
    """
    values = list(mean_entropy_per_head)
    if not values:
        raise ValueError("h_max needs at least one head")
    last = 1
    while last < len(values) and values[last] > values[last - 1]:
        last += 1
    return last


def draft_targets(out: Sequence[int], starts: Sequence[int], num_heads: int) -> np.ndarray:
    """The tokens each draft position should have guessed: [S, K], -1 where the answer has ended.

    Row s is a step beginning with starts[s] committed tokens; column i-1 is out[starts[s] + i - 1].
        >>> draft_targets([10, 11, 12], [1, 2], 3).tolist()
        [[11, 12, -1], [12, -1, -1]]
    """
    out = np.asarray(out, dtype=np.int64)
    idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(num_heads)[None, :]  # [S, K]
    padded = np.concatenate([out, np.full(num_heads, -1, dtype=np.int64)])
    return padded[np.minimum(idx, len(padded) - 1)]


def topk_hits(lattice_tokens: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """[S, K] bool: the target is among the first k candidates of its head (never where target = -1).

        >>> topk_hits(np.array([[[5, 6], [7, 8]]]), np.array([[6, -1]]), 2).tolist()
        [[True, False]]
    """
    lattice_tokens = np.asarray(lattice_tokens)  # [S, K, k']
    targets = np.asarray(targets)  # [S, K]
    if k < 1 or k > lattice_tokens.shape[-1]:
        raise ValueError(f"k={k} but the lattice keeps {lattice_tokens.shape[-1]} candidates per head")
    return (lattice_tokens[..., :k] == targets[..., None]).any(-1) & (targets >= 0)


def topk_accuracy(lattice_tokens: np.ndarray, targets: np.ndarray, k: int) -> list[float]:
    """Per-head share of steps whose head top-k holds the token actually produced (NaN: no target).

    lattice_tokens [S, K, k'] (best first), targets [S, K] with -1 = no target.
        >>> tokens = np.array([[[1, 2], [3, 4]], [[5, 6], [7, 8]]])
        >>> topk_accuracy(tokens, np.array([[2, 3], [5, -1]]), 1)
        [0.5, 1.0]
        >>> topk_accuracy(tokens, np.array([[2, 3], [5, -1]]), 2)
        [1.0, 1.0]
    """
    hits = topk_hits(lattice_tokens, targets, k)  # [S, K]
    valid = (np.asarray(targets) >= 0).sum(0)  # [K]
    return [float(h / v) if v else math.nan for h, v in zip(hits.sum(0), valid)]


def accepted_length(row: np.ndarray) -> int:
    """Number of leading True entries of a bool row: what greedy verification accepts.

        >>> accepted_length(np.array([True, True, False, True]))
        2
    """
    return row.size if row.all() else int(row.argmin())


def oracle_walk(match_topk: np.ndarray) -> list[int]:
    """Tokens committed per step by a perfect selector; match_topk [T, K] bool.

    Row t is the step that begins with t answer tokens committed (row 0 is the first step, which has
    no draft in blockdraft.engine: pass it all False); match_topk[t, i-1] says whether head i's top-k
    in that step holds out[t + i - 1]. The walk accepts the n leading True positions, commits
    n + 1 tokens (the target's own token included, never past the answer's end T) and jumps to t + n + 1.
        >>> oracle_walk(np.array([[0, 0], [1, 1], [0, 0], [0, 0], [1, 0]], dtype=bool))
        [1, 3, 1]
    """
    match = np.asarray(match_topk, dtype=bool)  # [T, K]
    total, committed, t = match.shape[0], [], 0
    while t < total:
        step = min(accepted_length(match[t]) + 1, total - t)
        committed.append(step)
        t += step
    return committed


def oracle_block_efficiency(match_topk: np.ndarray) -> float:
    """Block efficiency (tokens / step) of the oracle walk; with each head's top-1 it is chain BPD's own.

        >>> oracle_block_efficiency(np.array([[0, 0], [1, 1], [0, 0], [0, 0], [1, 0]], dtype=bool))
        1.6666666666666667

    NaN for an empty answer.
    """
    steps = oracle_walk(match_topk)
    return sum(steps) / len(steps) if steps else math.nan


def oracle_bound_steps(match_topk: np.ndarray, can_stop_early: bool) -> int:
    """Fewest steps any top-k selector could need: a true upper bound on block efficiency, monotone in k.

    The greedy walk (oracle_walk) is what a selector that maximises each step's acceptance reaches;
    it is NOT monotone in k: accepting more now can land on a position where the heads miss. A
    selector with >= 2 candidates per head can also stop early (draft a wrong candidate after m
    right ones), so from t it may jump to any t + m + 1, m = 0..n; the best such plan is this
    dynamic programme. With one candidate per head (k = 1) no choice exists and it equals the walk.
        >>> m = np.array([[0, 0], [1, 0], [1, 1], [0, 0], [0, 0], [0, 0]], dtype=bool)
        >>> len(oracle_walk(m)), oracle_bound_steps(m, can_stop_early=True)   # 0->1->3->4->5->6 vs 0->1->2->5->6
        (5, 4)
    """
    match = np.asarray(match_topk, dtype=bool)  # [T, K]
    total = match.shape[0]
    best = np.zeros(total + 1, dtype=np.int64)  # best[t]: fewest steps from t to the end
    for t in range(total - 1, -1, -1):
        n = accepted_length(match[t])
        jumps = range(n + 1) if can_stop_early else (n,)
        best[t] = 1 + min(best[min(t + m + 1, total)] for m in jumps)
    return int(best[0])


def pearson_r(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN with fewer than 2 points or a constant series.

        >>> round(pearson_r([1, 2, 3], [2, 4, 7]), 4)
        0.9934
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"pearson_r needs equal lengths, got {x.size} and {y.size}")
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])
