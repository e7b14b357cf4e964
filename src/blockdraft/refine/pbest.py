"""Exact p-best paths through a top-k lattice under head log-probs + alpha * n-gram LM (Kim et al. 2024).

A path picks one candidate column per draft position; its score is the sum of the picked head
log-probs plus alpha times the n-gram log-probs of the picked tokens after the committed context.

Search, exact and without enumerating k**K paths:
1. Relaxed graph over (position, column): every LM transition gets an admissible upper bound
   (NgramLM.pair_upper_bound). Its backward Viterbi gives an optimistic completion bound for
   each (position, column). A width-p beam with exact LM scores (each layer's candidates
   pre-selected by that bound) yields p real paths; the worst of them bounds the true p-th
   best score from below.
2. Forward pass over (position, minimised LM state) nodes, keeping only transitions whose
   optimistic total can still reach that lower bound (cheap bound first, then the exact LM score).
   Histories with the same state have the same future, so merged nodes lose nothing.
3. Backward Viterbi on the pruned exact graph, then Lawler-style lazy enumeration of its p best
   paths (each popped path spawns one deviation per later position), best first.
With no LM (or alpha = 0) the graph has one node per position and step 3 alone runs.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .ngram import NgramLM

_REL_TOL = 1e-9  # slack on pruning comparisons, so float rounding never drops a tied path
_BEAM_PRESELECT = 2  # beam candidates scored exactly per kept path (measured: tight and cheapest)
_MAX_TIE_POPS = 256  # extra pops spent ranking paths tied at the cut (degenerate lattices only)


@dataclass
class _Edges:
    """Transitions from the nodes of one layer to the next, choosing column `col`."""

    src: np.ndarray  # [E] node index in this layer
    dst: np.ndarray  # [E] node index in the next layer
    col: np.ndarray  # [E] lattice column
    w: np.ndarray  # [E] float64 edge score


@dataclass
class _Sorted:
    """One layer's out-edges grouped by source node, best completion first (Python lists: the
    enumeration reads single elements)."""

    ptr: list[int]  # [n+1] edges of node v are ptr[v]:ptr[v+1]
    dst: list[int]
    col: list[int]
    w: list[float]
    val: list[float]  # w + best completion of dst; -inf for dead ends


def pbest_paths(
    tokens: np.ndarray,
    logprobs: np.ndarray,
    lm: NgramLM | None,
    context: Sequence[int],
    alpha: float,
    p: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The p best distinct paths of a [K, k] lattice: (token paths [p', K] int64, scores [p'] float64).

    p' = min(p, k**K). Scores sum head log-probs plus alpha * n-gram ln-probs, the LM state
    starting from `context` (the committed ids; its last id precedes draft position 1).
    Sorted by descending score, ties by the column-index sequence. Paths are distinct as column
    sequences (hence as token strings when each row's tokens are distinct, as top-k rows are).
    lm None or alpha 0 gives the "p-best 0-gram" baseline (head scores alone).

    >>> tokens = np.array([[5, 7], [8, 9]])                 # position 1: 5 or 7; position 2: 8 or 9
    >>> logprobs = np.log(np.array([[0.6, 0.4], [0.5, 0.5]]))
    >>> paths, scores = pbest_paths(tokens, logprobs, None, [1, 2], alpha=0.0, p=3)
    >>> paths.tolist()                                      # ties (0.6*0.5 twice) by column order
    [[5, 8], [5, 9], [7, 8]]
    >>> np.exp(scores).round(2).tolist()
    [0.3, 0.3, 0.2]

    A 3-gram that saw "1 2 7 9" twice and "1 2 5 8" once lifts 7 9 after the context [1, 2]:
    its score is ln 0.4 + ln 0.5 + alpha * (ln p(7 | 1 2) + ln p(9 | 2 7)) = -1.609 + (-0.723 - 0.252).

    >>> from blockdraft.refine.ngram import train_ngram
    >>> lm = train_ngram([[1, 2, 7, 9], [1, 2, 5, 8], [1, 2, 7, 9]], order=3, vocab_size=10)
    >>> paths, scores = pbest_paths(tokens, logprobs, lm, [1, 2], alpha=1.0, p=3)
    >>> paths.tolist(), scores.round(3).tolist()
    ([[7, 9], [5, 8], [7, 8]], [-2.585, -2.6, -5.945])
    """
    cols, scores = pbest_columns(tokens, logprobs, lm, context, alpha, p)
    tokens = np.asarray(tokens, dtype=np.int64)
    return tokens[np.arange(tokens.shape[0])[None, :], cols], scores


def pbest_columns(
    tokens: np.ndarray,
    logprobs: np.ndarray,
    lm: NgramLM | None,
    context: Sequence[int],
    alpha: float,
    p: int,
) -> tuple[np.ndarray, np.ndarray]:
    """As pbest_paths, but returns the chosen column indices [p', K] instead of token ids."""
    tokens, head = _check_lattice(tokens, logprobs, alpha, p)
    n_paths = min(p, tokens.shape[1] ** tokens.shape[0])
    if lm is None or alpha == 0.0:
        one = np.zeros(tokens.shape[1], np.int64)  # [k] every column leaves and enters the single node
        layers = [_Edges(one, one, np.arange(len(row)), row) for row in head]
        return _best_paths(layers, [1] * (len(head) + 1), n_paths)
    return _lm_pbest(tokens, head, lm, context, float(alpha), n_paths)


def _check_lattice(tokens, logprobs, alpha: float, p: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.asarray(tokens, dtype=np.int64)
    head = np.asarray(logprobs, dtype=np.float64)
    if tokens.ndim != 2 or tokens.shape != head.shape or tokens.size == 0:
        raise ValueError(
            f"tokens and logprobs must be matching non-empty [K, k] arrays, got {tokens.shape} and {head.shape}"
        )
    if not np.all(np.isfinite(head)):
        raise ValueError("lattice logprobs must be finite (clamp -inf to a large negative number)")
    if not (np.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    return tokens, head


def _lm_pbest(tokens: np.ndarray, head: np.ndarray, lm: NgramLM, context: Sequence[int], alpha: float, n_paths: int):
    """Steps 1-3 of the module docstring: (columns [P, K], scores [P])."""
    big_k, k = tokens.shape
    itok = lm.internal_ids(tokens).reshape(big_k, k)  # [K, k]
    start = lm.begin(context)
    first_lp, first_states = lm.step_many(start.take(np.zeros(k, np.int64)), itok[0], internal=True)  # [k]
    ub = np.zeros((big_k, k, k))  # [K, k, k] ub[i, a, b]: bound on ln p(tokens[i, b] | ... tokens[i-1, a])
    if big_k > 1:
        prev = np.broadcast_to(tokens[:-1, :, None], (big_k - 1, k, k))
        nxt = np.broadcast_to(tokens[1:, None, :], (big_k - 1, k, k))
        ub[1:] = lm.pair_upper_bound(prev.ravel(), nxt.ravel()).reshape(big_k - 1, k, k)
    relaxed = head[:, None, :] + alpha * ub  # [K, k, k] relaxed[i, a, b]: edge (i-1, a) -> (i, b)
    relaxed[0] = head[0] + alpha * first_lp  # position 0 is exact and has no previous column
    to_go = _completion_bounds(relaxed)  # [K, k]
    floor = _beam_floor(lm, itok, head, alpha, ub, to_go, relaxed[0, 0], first_states, n_paths)
    threshold = floor - _REL_TOL * (1.0 + abs(floor))
    layers, sizes = _forward(lm, itok, head, alpha, ub, to_go, threshold, relaxed[0, 0], first_states)
    return _best_paths(layers, sizes, n_paths)


def _completion_bounds(relaxed: np.ndarray) -> np.ndarray:
    """[K, k] best relaxed score of positions i+1..K-1 given column c at position i."""
    to_go = np.zeros(relaxed.shape[:2])
    for i in range(len(relaxed) - 1, 0, -1):
        to_go[i - 1] = (relaxed[i] + to_go[i][None, :]).max(axis=1)
    return to_go


def _beam_floor(lm: NgramLM, itok, head, alpha: float, ub, to_go, first, first_states, n_paths: int) -> float:
    """Exact score of the worst of n_paths distinct real paths: a lower bound on the true p-th best.

    Width-n_paths beam over prefixes ranked by exact prefix score + to_go; per layer only the
    _BEAM_PRESELECT * n_paths extensions with the best optimistic score get exact LM scores.
    """
    big_k, k = itok.shape
    score, states, last = np.zeros(1), None, np.zeros(1, np.int64)  # [m] beam
    for i in range(big_k):
        if i == 0:
            cand, nxt, c = first, first_states, np.arange(k)
        else:
            optimistic = (score[:, None] + head[i] + alpha * ub[i][last] + to_go[i]).ravel()  # [m*k]
            m = min(_BEAM_PRESELECT * n_paths, len(optimistic))
            sel = np.argpartition(-optimistic, m - 1)[:m] if m < len(optimistic) else np.arange(m)
            v, c = np.divmod(sel, k)
            lp, nxt = lm.step_many(states.take(v), itok[i, c], internal=True)
            cand = score[v] + head[i, c] + alpha * lp
        f = cand + to_go[i, c]
        m = min(n_paths, len(f))
        top = np.argpartition(-f, m - 1)[:m] if m < len(f) else np.arange(m)
        score, states, last = cand[top], nxt.take(top), c[top]
    return float(score.min())


def _forward(lm, itok, head, alpha, ub, to_go, threshold, first, first_states):
    """Expand (position, LM state) nodes, keeping transitions whose optimistic total >= threshold.

    Returns the per-position edges and the node count of every layer (layer 0 = the start).
    """
    big_k, k = itok.shape
    g = np.zeros(1)  # [n] best prefix score of each node
    last = np.full(1, -1)  # [n] column of the state's last word (-1: empty state, word irrelevant)
    states = None
    layers, sizes = [], [1]
    for i in range(big_k):
        if i == 0:
            v, c = np.zeros(k, np.int64), np.arange(k)
            w, nxt = first, first_states
        else:
            lm_bound = np.where(last[:, None] >= 0, ub[i, np.maximum(last, 0)], lm.uni_lp[itok[i]])  # [n, k]
            bound = g[:, None] + head[i] + alpha * lm_bound + to_go[i]  # [n, k]
            v, c = np.nonzero(bound >= threshold)
            lp, nxt = lm.step_many(states.take(v), itok[i, c], internal=True)
            w = head[i, c] + alpha * lp  # [E]
        keep = g[v] + w + to_go[i, c] >= threshold
        v, c, w = v[keep], c[keep], w[keep]
        codes, rep, dst = np.unique(nxt.codes()[keep], return_index=True, return_inverse=True)
        g_next = np.full(len(codes), -np.inf)
        np.maximum.at(g_next, dst, g[v] + w)
        states = nxt.take(np.flatnonzero(keep)[rep])
        last = np.where(states.length > 0, c[rep], -1)
        g = g_next
        layers.append(_Edges(v, dst.reshape(-1), c, w))
        sizes.append(len(codes))
    return layers, sizes


def _sort_layers(layers: list[_Edges], sizes: list[int]) -> list[_Sorted]:
    """Backward Viterbi, then each node's out-edges sorted by value desc, column asc."""
    beta = np.zeros(sizes[-1])
    out: list[_Sorted] = []
    for i in range(len(layers) - 1, -1, -1):
        e = layers[i]
        val = e.w + beta[e.dst]
        order = np.lexsort((e.col, -val, e.src))
        src = e.src[order]
        beta = np.full(sizes[i], -np.inf)
        np.maximum.at(beta, e.src, val)
        ptr = np.searchsorted(src, np.arange(sizes[i] + 1)).tolist()
        dst, col, w = e.dst[order].tolist(), e.col[order].tolist(), e.w[order].tolist()
        out.append(_Sorted(ptr, dst, col, w, val[order].tolist()))
    return out[::-1]


def _best_paths(layers: list[_Edges], sizes: list[int], n_paths: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact n_paths best full paths of a layered DAG: (columns [P, K], scores [P]).

    Lawler-style: a candidate is a fixed prefix, a rank among the next node's sorted out-edges,
    then the best completion; popping one yields a path and its deviations. Scores are summed
    left to right along each path, so equal-score paths have bit-equal scores, and paths tied
    (to ~1e-9) with the last one kept are popped too (at most _MAX_TIE_POPS) and re-ranked by
    (score, columns): the tie order then does not depend on which way the search met them.
    """
    sl = _sort_layers(layers, sizes)
    best = _best_completions(sl, sizes)
    heap: list = []
    _push(heap, sl, best, 0, 0, 0, (), (0,), ())
    found: list[tuple[float, tuple[int, ...]]] = []
    cut = -np.inf
    while heap and (len(found) < n_paths or (-heap[0][0] >= cut and len(found) < n_paths + _MAX_TIE_POPS)):
        neg_f, cols, i, v, r, nodes, ws = heapq.heappop(heap)
        found.append((-neg_f, cols))
        if len(found) == n_paths:
            cut = -neg_f - _REL_TOL * (1.0 + abs(neg_f))
        _push(heap, sl, best, i, v, r + 1, cols[:i], nodes[: i + 1], ws[:i])
        for j in range(i + 1, len(sl)):
            _push(heap, sl, best, j, nodes[j], 1, cols[:j], nodes[: j + 1], ws[:j])
    found.sort(key=lambda t: (-t[0], t[1]))
    found = found[:n_paths]
    return np.array([c for _, c in found], np.int64).reshape(-1, len(sl)), np.array([s for s, _ in found])


def _best_completions(sl: list[_Sorted], sizes: list[int]) -> list[list[tuple]]:
    """best[i][v] = (columns, edge scores, nodes) of node v's best completion from layer i on."""
    best = [[((), (), ())] * sizes[-1]]
    for i in range(len(sl) - 1, -1, -1):
        layer, after = sl[i], best[0]
        row = []
        for v in range(sizes[i]):
            e = layer.ptr[v]
            if e < layer.ptr[v + 1] and layer.val[e] > -np.inf:
                cols, ws, nodes = after[layer.dst[e]]
                row.append(((layer.col[e],) + cols, (layer.w[e],) + ws, (layer.dst[e],) + nodes))
            else:
                row.append(None)  # dead end: its in-edges have value -inf and are never taken
        best.insert(0, row)
    return best


def _push(heap: list, sl: list[_Sorted], best: list, i: int, v: int, r: int, cols: tuple, nodes: tuple, ws: tuple):
    """Queue the path: prefix (cols, nodes, ws) to node v of layer i, its r-th best edge, then best edges."""
    layer = sl[i]
    e = layer.ptr[v] + r
    if e >= layer.ptr[v + 1] or layer.val[e] == -np.inf:
        return
    d = layer.dst[e]
    tail_cols, tail_ws, tail_nodes = best[i + 1][d]
    ws = ws + (layer.w[e],) + tail_ws
    heapq.heappush(heap, (-sum(ws), cols + (layer.col[e],) + tail_cols, i, v, r, nodes + (d,) + tail_nodes, ws))
