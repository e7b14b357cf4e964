"""Draft-analysis metrics on hand-made drafts with known answers, and oracle walk properties."""
import doctest
import math

import numpy as np
import pytest

from blockdraft.analysis import metrics
from blockdraft.analysis.metrics import (consecutive_repeat_rate, draft_targets, h_max, head_entropy_summary,
                                         max_run_mean, oracle_block_efficiency, oracle_bound_steps, oracle_walk,
                                         pearson_r, repetition_of_drafts, topk_accuracy, topk_hits)


def test_docstring_examples():
    assert doctest.testmod(metrics).failed == 0


def test_repetition_hand_made():
    drafts = [[5, 5, 5, 5], [1, 2, 3, 4], [9, 9, 8, 8]]  # pairs: 3 + 0 + 2 repeats of 9
    assert consecutive_repeat_rate(drafts) == pytest.approx(5 / 9)
    assert max_run_mean(drafts) == pytest.approx((4 + 1 + 2) / 3)
    assert consecutive_repeat_rate([[1], []]) != consecutive_repeat_rate([[1], []])  # NaN: no pairs
    assert math.isnan(max_run_mean([]))
    rep = repetition_of_drafts([None, [], *drafts])
    assert rep == {"consec_pct": pytest.approx(500 / 9), "max_run_mean": pytest.approx(7 / 3), "drafts": 3, "pairs": 9}


def test_entropy_summary_and_h_max():
    ent = np.array([[1.0, 2.0, 3.0, 1.0], [3.0, 4.0, 5.0, 1.0]])  # [S=2, K=4]
    s = head_entropy_summary(ent)
    assert s["mean"] == [2.0, 3.0, 4.0, 1.0] and s["steps"] == 2
    assert s["quantiles"]["q50"] == [2.0, 3.0, 4.0, 1.0] and s["quantiles"]["q10"][0] == pytest.approx(1.2)
    assert h_max(s["mean"]) == 3
    assert h_max([1.0, 1.0, 2.0]) == 1  # flat is not rising
    assert h_max([0.5]) == 1 and h_max([1, 2, 3, 4]) == 4
    empty = head_entropy_summary(np.zeros((0, 3)))
    assert empty["steps"] == 0 and all(math.isnan(v) for v in empty["mean"])
    with pytest.raises(ValueError):
        h_max([])


def test_targets_and_accuracy():
    out = [10, 11, 12, 13]
    targets = draft_targets(out, [1, 3], 2)  # steps beginning with 1 and 3 tokens committed
    assert targets.tolist() == [[11, 12], [13, -1]]
    lattice = np.array([[[11, 0, 0], [0, 12, 0]], [[0, 0, 13], [13, 0, 0]]])  # [S=2, K=2, k=3]
    assert topk_accuracy(lattice, targets, 1) == [0.5, 0.0]
    assert topk_accuracy(lattice, targets, 2) == [0.5, 1.0]
    assert topk_accuracy(lattice, targets, 3) == [1.0, 1.0]
    assert not topk_hits(lattice, targets, 3)[1, 1]  # -1 never matches, even against token 13
    all_missing = topk_accuracy(lattice, np.full((2, 2), -1), 1)
    assert all(math.isnan(a) for a in all_missing)
    with pytest.raises(ValueError):
        topk_accuracy(lattice, targets, 4)


def test_oracle_walk_hand_made():
    # T = 6 answer tokens, K = 3 heads. Step 0 has no draft; from t=1 all 3 heads hit -> commit 4
    # (t=1..4), jump to 5: commit 1 (the answer ends at T=6 whatever the match says).
    match = np.zeros((6, 3), dtype=bool)
    match[1] = True
    match[5] = True
    assert oracle_walk(match) == [1, 4, 1]
    assert oracle_block_efficiency(match) == 2.0
    match[1, 1] = False  # a miss at head 2 stops the walk there: accept 1, commit 2
    assert oracle_walk(match) == [1, 2, 1, 1, 1]
    assert oracle_walk(np.zeros((0, 3), dtype=bool)) == [] and math.isnan(oracle_block_efficiency(np.zeros((0, 2))))


def _walk_by_hand(match: np.ndarray) -> list[int]:
    """The obvious loop, position by position."""
    t, steps = 0, []
    while t < len(match):
        n = 0
        while n < match.shape[1] and match[t, n]:
            n += 1
        steps.append(min(n + 1, len(match) - t))
        t += steps[-1]
    return steps


@pytest.mark.parametrize("seed", range(20))
def test_oracle_properties_random(seed):
    rng = np.random.default_rng(seed)
    T, K = int(rng.integers(1, 60)), int(rng.integers(1, 6))
    rank = rng.geometric(0.35, size=(T, K)) - 1  # rank of the true token in each head's list
    rank[0] = 10**6  # the first step has no draft
    ks = (1, 2, 4, 8, 16)
    for k in ks:
        walk = oracle_walk(rank < k)
        assert walk == _walk_by_hand(rank < k) and sum(walk) == T
        assert oracle_block_efficiency(rank < k) >= 1.0
        # the bound never needs more steps than the greedy walk, and equals it without a choice (k = 1)
        assert oracle_bound_steps(rank < k, k > 1) <= len(walk)
    assert oracle_bound_steps(rank < 1, False) == len(oracle_walk(rank < 1))
    bound = [T / oracle_bound_steps(rank < k, k > 1) for k in ks]  # block efficiency
    assert all(a <= b + 1e-12 for a, b in zip(bound, bound[1:]))  # non-decreasing in k, >= actual (k = 1)


def test_greedy_oracle_is_not_monotone_in_k():
    """Why the bound exists: accepting more at t=1 (k=2) lands on t=3, where every head misses."""
    top1 = np.array([[0, 0, 0], [0, 0, 0], [1, 1, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=bool)
    top2 = top1.copy()
    top2[1, 0] = True
    assert oracle_walk(top1) == [1, 1, 4] and oracle_walk(top2) == [1, 2, 1, 1, 1]
    assert oracle_bound_steps(top2, can_stop_early=True) == 3


def test_pearson():
    assert pearson_r([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert pearson_r([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson_r([1, 1, 1], [1, 2, 3])) and math.isnan(pearson_r([1], [2]))
    with pytest.raises(ValueError):
        pearson_r([1, 2], [1, 2, 3])
