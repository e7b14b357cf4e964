"""Exact p-best lattice search: equal to brute-force enumeration, sorted, distinct, deterministic ties."""
from __future__ import annotations

import doctest
import itertools

import numpy as np
import pytest

from blockdraft.refine import pbest as pbest_module
from blockdraft.refine.ngram import BOS, NgramLM, train_ngram
from blockdraft.refine.pbest import pbest_columns, pbest_paths

V = 12


def random_lm(order: int, seed: int) -> NgramLM:
    """A small-vocabulary LM, so lattices are dense with seen n-grams (the hard case for pruning)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, V + 1)
    seqs = [rng.choice(V, size=int(rng.integers(0, 14)), p=weights / weights.sum()).tolist() for _ in range(250)]
    return train_ngram(seqs, order, prune=2 if seed % 3 == 0 and order > 2 else 0, vocab_size=V)


def random_lattice(rng: np.random.Generator, big_k: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens [K, k] distinct per row (some outside the LM vocabulary); logprobs [K, k] sorted descending."""
    tokens = np.stack([rng.choice(max(V + 3, k + 4), size=k, replace=False) for _ in range(big_k)])
    logprobs = np.sort(np.log(rng.dirichlet(np.full(k, 0.7), size=big_k) + 1e-9), axis=1)[:, ::-1]
    return tokens, np.ascontiguousarray(logprobs)


def brute_force(tokens, logprobs, lm, context, alpha) -> list[tuple[float, tuple[int, ...]]]:
    """Every column path with its score (left-to-right sum), best first, ties by columns."""
    big_k, k = tokens.shape
    cols = np.array(list(itertools.product(range(k), repeat=big_k)))  # [k**K, K]
    pos = np.arange(big_k)[None, :]
    lm_lp = lm.score_continuations(context, tokens[pos, cols]) if lm is not None else np.zeros(cols.shape)
    per_position = logprobs[pos, cols] + alpha * lm_lp  # [k**K, K]
    scores = [sum(row) for row in per_position.tolist()]
    return sorted(zip(scores, map(tuple, cols.tolist())), key=lambda t: (-t[0], t[1]))


@pytest.mark.parametrize("seed", range(8))
def test_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    lm = random_lm(order=1 + seed % 4, seed=seed)
    big_k, k = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    tokens, logprobs = random_lattice(rng, big_k, k)
    context = [BOS] + rng.integers(0, V, size=int(rng.integers(0, 4))).tolist() if seed % 2 else [7, 3]
    for alpha in (0.0, 0.5, 2.0):
        expected = brute_force(tokens, logprobs, lm, context, alpha)
        for p in (1, 3, 16):
            cols, scores = pbest_columns(tokens, logprobs, lm, context, alpha, p)
            want = expected[:p]
            assert [tuple(c) for c in cols.tolist()] == [c for _, c in want], (alpha, p)
            np.testing.assert_allclose(scores, [s for s, _ in want], rtol=1e-12, atol=1e-12)


def test_equals_brute_force_on_a_deeper_lattice():
    """K=6, k=6 (46,656 paths), 4-gram: exercises bound pruning and state merging at depth."""
    rng = np.random.default_rng(42)
    lm = random_lm(order=4, seed=4)
    tokens, logprobs = random_lattice(rng, 6, 6)
    for alpha in (0.5, 2.0):
        expected = brute_force(tokens, logprobs, lm, [1, 2, 3], alpha)[:16]
        cols, scores = pbest_columns(tokens, logprobs, lm, [1, 2, 3], alpha, 16)
        assert [tuple(c) for c in cols.tolist()] == [c for _, c in expected]
        np.testing.assert_allclose(scores, [s for s, _ in expected], rtol=1e-12)


def test_paths_are_distinct_sorted_and_from_their_rows():
    rng = np.random.default_rng(3)
    lm = random_lm(order=3, seed=1)
    tokens, logprobs = random_lattice(rng, 8, 16)
    paths, scores = pbest_paths(tokens, logprobs, lm, [BOS, 4], 1.0, 16)
    assert paths.shape == (16, 8) and paths.dtype == np.int64 and scores.shape == (16,)
    assert len({tuple(p) for p in paths.tolist()}) == 16
    assert np.all(np.diff(scores) <= 0)
    assert all(np.isin(paths[:, i], tokens[i]).all() for i in range(8))
    cols, _ = pbest_columns(tokens, logprobs, lm, [BOS, 4], 1.0, 16)
    assert np.array_equal(tokens[np.arange(8)[None, :], cols], paths)


def test_no_lm_or_zero_alpha_is_the_head_only_pbest():
    rng = np.random.default_rng(5)
    lm = random_lm(order=4, seed=2)
    tokens, logprobs = random_lattice(rng, 3, 4)
    expected = brute_force(tokens, logprobs, None, [], 0.0)[:10]
    for model, alpha in ((None, 0.0), (None, 3.0), (lm, 0.0)):
        cols, scores = pbest_columns(tokens, logprobs, model, [1], alpha, 10)
        assert [tuple(c) for c in cols.tolist()] == [c for _, c in expected]
        np.testing.assert_allclose(scores, [s for s, _ in expected])


def test_uniform_lm_keeps_the_head_ranking():
    """Every id once per line: all ids have the same probability in every context."""
    uniform = train_ngram([[i] for i in range(V)], 1, vocab_size=V)
    assert len({round(uniform.logprob([], t), 12) for t in range(V)}) == 1
    rng = np.random.default_rng(6)
    tokens, logprobs = random_lattice(rng, 5, 6)
    tokens %= V
    head_cols, head_scores = pbest_columns(tokens, logprobs, None, [], 0.0, 16)
    cols, scores = pbest_columns(tokens, logprobs, uniform, [2], 1.5, 16)
    assert np.array_equal(cols[0], logprobs.argmax(axis=1))
    assert np.array_equal(cols, head_cols)
    np.testing.assert_allclose(scores - head_scores, 5 * 1.5 * uniform.logprob([], 0))


def test_ties_break_by_column_sequence():
    tokens = np.arange(12).reshape(3, 4)
    logprobs = np.log(np.full((3, 4), 0.25))  # all 64 paths tie
    cols, scores = pbest_columns(tokens, logprobs, None, [], 0.0, 5)
    assert [tuple(c) for c in cols.tolist()] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 1, 0)]
    assert len(set(scores.tolist())) == 1
    lm = random_lm(order=2, seed=1)
    tied = np.log(np.array([[0.5, 0.5], [0.5, 0.5]]))
    for alpha in (0.0, 1.0):
        expected = brute_force(np.array([[3, 3], [5, 5]]), tied, lm, [1], alpha)
        cols, _ = pbest_columns(np.array([[3, 3], [5, 5]]), tied, lm, [1], alpha, 4)  # duplicated tokens: LM ties too
        assert [tuple(c) for c in cols.tolist()] == [c for _, c in expected] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_p_larger_than_the_lattice_returns_every_path():
    rng = np.random.default_rng(7)
    tokens, logprobs = random_lattice(rng, 2, 3)
    paths, scores = pbest_paths(tokens, logprobs, random_lm(2, 3), [], 1.0, 100)
    assert paths.shape == (9, 2) and len({tuple(p) for p in paths.tolist()}) == 9


def test_rejects_bad_input():
    tokens, logprobs = np.zeros((2, 3), np.int64), np.zeros((2, 3))
    with pytest.raises(ValueError, match="matching"):
        pbest_paths(tokens, logprobs[:, :2], None, [], 0.0, 1)
    with pytest.raises(ValueError, match="p must"):
        pbest_paths(tokens, logprobs, None, [], 0.0, 0)
    with pytest.raises(ValueError, match="alpha"):
        pbest_paths(tokens, logprobs, None, [], -1.0, 1)
    with pytest.raises(ValueError, match="finite"):
        pbest_paths(tokens, np.full((2, 3), -np.inf), None, [], 0.0, 1)


def test_docstring_example():
    assert doctest.testmod(pbest_module, raise_on_error=True).attempted > 0
