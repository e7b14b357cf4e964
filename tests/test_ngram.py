"""Token n-gram LM: interpolated modified Kneser-Ney against a slow reference, normalisation, pruning,
state stepping, .npz and ARPA round trips, and one-line errors for bad files."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from blockdraft.errors import BlockdraftError
from blockdraft.refine.ngram import BOS, EOS, NgramFileError, NgramLM, train_ngram

V = 12
FALLBACK = (0.5, 1.0, 1.5)


def corpus(seed: int = 0, lines: int = 300) -> list[list[int]]:
    """Skewed ids with repeats (so count-of-counts 1..4 exist) and some empty lines."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, V - 1)
    weights /= weights.sum()
    return [rng.choice(V - 2, size=int(rng.integers(0, 12)), p=weights).tolist() for _ in range(lines)]


# ---- slow reference: textbook interpolated modified KN over tuples -----------------------------------


class ReferenceKN:
    """Dict-based interpolated modified Kneser-Ney with lmplz's conventions (see ngram.py)."""

    def __init__(self, seqs: list[list[int]], order: int, vocab: int):
        self.order, self.vocab = order, vocab
        raw = [Counter() for _ in range(order + 1)]
        for seq in seqs:
            padded = ["<s>"] + list(seq) + ["</s>"]
            for n in range(1, order + 1):
                for i in range(len(padded) - n + 1):
                    raw[n][tuple(padded[i : i + n])] += 1
        self.adj = [Counter() for _ in range(order + 1)]
        for n in range(1, order + 1):
            for gram, c in raw[n].items():
                if n == order or gram[0] == "<s>":
                    self.adj[n][gram] = c
                else:
                    self.adj[n][gram] = sum(1 for longer in raw[n + 1] if longer[1:] == gram)
        self.disc = [None] + [self._discounts(n) for n in range(1, order + 1)]
        self.ext = [{} for _ in range(order + 1)]  # context -> {n-gram: adjusted count}
        for n in range(2, order + 1):
            for gram, c in self.adj[n].items():
                self.ext[n].setdefault(gram[:-1], {})[gram] = c

    def _discounts(self, n: int) -> tuple[float, float, float]:
        counts = [c for g, c in self.adj[n].items() if g != ("<s>",)]
        t = [sum(1 for c in counts if c == k) for k in (1, 2, 3, 4)]
        if min(t) == 0:
            return FALLBACK
        y = t[0] / (t[0] + 2 * t[1])
        d = (1 - 2 * y * t[1] / t[0], 2 - 3 * y * t[2] / t[1], 3 - 4 * y * t[3] / t[2])
        return d if all(0 < x <= k for k, x in zip((1, 2, 3), d)) else FALLBACK

    def _d(self, n: int, c: int) -> float:
        return self.disc[n][min(c, 3) - 1]

    def prob(self, history: tuple, word) -> float:
        n = len(history) + 1
        if n == 1:
            counts = {g: c for g, c in self.adj[1].items() if g != ("<s>",)}
            total = sum(counts.values())
            gamma = sum(self._d(1, c) for c in counts.values()) / total
            c = counts.get((word,), 0)
            return (c - self._d(1, c) if c else 0.0) / total + gamma / (self.vocab + 1)
        ext = self.ext[n].get(history, {})
        if not ext:
            return self.prob(history[1:], word)
        total = sum(ext.values())
        gamma = sum(self._d(n, c) for c in ext.values()) / total
        c = ext.get(history + (word,), 0)
        return (c - self._d(n, c) if c else 0.0) / total + gamma * self.prob(history[1:], word)

    def word(self, t: int):
        return {BOS: "<s>", EOS: "</s>"}.get(t, t if 0 <= t < self.vocab else "<unk>")

    def logprob(self, context: list, token: int) -> float:
        """Histories holding <unk> (or a mid-line <s>/</s>) match nothing and back off naturally."""
        ctx = [self.word(t) for t in context]
        history = tuple(ctx[max(len(ctx) - (self.order - 1), 0) :]) if self.order > 1 else ()
        return math.log(self.prob(history, self.word(token)))


CONTEXTS = [[], [BOS], [BOS, 1], [0, 0], [3, 4, 5], [1, 1, 1, 1], [2, 99, 3], [0, 11], [BOS, 0, 1, 2]]
TARGETS = list(range(V)) + [EOS]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_matches_reference_kn(order):
    seqs = corpus(0)
    lm = train_ngram(seqs, order, vocab_size=V)
    ref = ReferenceKN(seqs, order, V)
    np.testing.assert_allclose(lm.meta["discounts"], ref.disc[1:], rtol=1e-12)
    assert any(tuple(d) != FALLBACK for d in ref.disc[1:]) or order < 3  # the estimator itself is exercised
    for ctx in CONTEXTS:
        for tok in TARGETS:
            assert lm.logprob(ctx, tok) == pytest.approx(ref.logprob(ctx, tok), abs=2e-6), (ctx, tok)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("prune", [0, 2, 3])
def test_normalised_over_vocabulary(order, prune):
    lm = train_ngram(corpus(1), order, prune=prune, vocab_size=V)
    for ctx in CONTEXTS:
        total = sum(math.exp(lm.logprob(ctx, tok)) for tok in TARGETS)
        assert total == pytest.approx(1.0, abs=1e-5), ctx


def test_pruning_shrinks_keeps_closure_and_normalisation():
    full = train_ngram(corpus(2), 4, vocab_size=V)
    pruned = train_ngram(corpus(2), 4, prune=(1, 3, 2), vocab_size=V)
    plain = train_ngram(corpus(2), 4, prune=(1, 3, 99), vocab_size=V)  # no 4-grams: trigrams by count alone
    assert pruned.num_ngrams()[:2] == full.num_ngrams()[:2]
    assert plain.num_ngrams()[2] < pruned.num_ngrams()[2] < full.num_ngrams()[2]  # kept 4-grams force trigrams
    assert plain.num_ngrams()[3] == 0 < pruned.num_ngrams()[3] < full.num_ngrams()[3]
    for n in range(3, 5):
        keys, lower = pruned._order_keys(n), pruned._order_keys(n - 1)
        assert np.isin(keys // pruned.base, lower).all() and np.isin(keys % pruned.base ** (n - 1), lower).all()
    assert train_ngram(corpus(2), 4, prune=1, vocab_size=V).num_ngrams() == full.num_ngrams()
    for ctx in CONTEXTS:
        assert sum(math.exp(pruned.logprob(ctx, t)) for t in TARGETS) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_state_stepping_equals_logprob(order):
    lm = train_ngram(corpus(3), order, prune=2 if order > 2 else 0, vocab_size=V)
    rng = np.random.default_rng(order)
    for _ in range(40):
        ctx = [t for t in rng.integers(-2, V + 3, size=int(rng.integers(0, 6))).tolist() if t != BOS]
        ctx = [BOS] + ctx if rng.random() < 0.3 else ctx  # EOS and out-of-range ids included
        state, history = lm.begin(ctx), list(ctx)
        for tok in rng.integers(-2, V + 2, size=6).tolist():
            tok = EOS if tok < 0 else tok
            lp, state = lm.step(state, tok)
            assert lp == pytest.approx(lm.logprob(history, tok), abs=1e-9)
            history.append(tok)
        assert np.array_equal(lm.begin(history).codes(), state.codes())


def test_step_many_and_batch_scoring_agree():
    lm = train_ngram(corpus(4), 4, vocab_size=V)
    rng = np.random.default_rng(0)
    ctx = [BOS, 1, 2]
    paths = rng.integers(0, V, size=(20, 5))  # [P, L]
    batch = lm.score_continuations(ctx, paths)  # [P, L]
    states = lm.begin(ctx).take(np.zeros(len(paths), np.int64))
    for j in range(paths.shape[1]):
        lp, states = lm.step_many(states, paths[:, j])
        np.testing.assert_allclose(lp, batch[:, j], atol=1e-9)
        np.testing.assert_allclose(batch[3, j], lm.logprob(ctx + paths[3, :j].tolist(), int(paths[3, j])), atol=1e-9)
    seq = [3, 1, 4, 1, 5]
    expected = sum(lm.logprob([BOS] + seq[:i], t) for i, t in enumerate(seq + [EOS]))
    assert lm.score_sequence(seq) == pytest.approx(expected, abs=1e-9)


def test_unseen_and_unknown_ids_get_the_finite_floor():
    lm = train_ngram([[0, 1, 2, 0, 1]], 3, vocab_size=50)
    floor = lm.floor_logprob
    assert np.isfinite(floor)
    assert lm.logprob([0, 1], 40) == lm.logprob([0, 1], 41) <= floor
    assert lm.logprob([], 40) == pytest.approx(floor)
    assert lm.logprob([], 10**6) == pytest.approx(floor)  # outside the vocabulary: <unk>
    assert lm.logprob([], -7) == pytest.approx(floor)
    assert np.isfinite(lm.logprob([49, 10**6], 3))
    with pytest.raises(ValueError):
        lm.logprob([0], BOS)


def test_pair_upper_bound_is_admissible():
    lm = train_ngram(corpus(5), 4, prune=(1, 2, 1), vocab_size=V)
    rng = np.random.default_rng(1)
    for _ in range(300):
        hist = rng.integers(-1, V, size=int(rng.integers(1, 5))).tolist()
        prev, tok = hist[-1], int(rng.integers(0, V + 1))
        bound = lm.pair_upper_bound(np.array([prev]), np.array([tok]))[0]
        assert lm.logprob(hist, tok) <= bound + 1e-9


def test_npz_round_trip_and_metadata(tmp_path):
    lm = train_ngram(corpus(6), 4, prune=2, vocab_size=V)
    path = tmp_path / "lm.ngram"  # exactly this name, no .npz appended
    lm.save(path)
    back = NgramLM.load(path, vocab_size=V)
    assert back.meta["order"] == 4 and back.meta["vocab_size"] == V
    assert back.meta["tokens"] == sum(len(s) for s in corpus(6))
    assert back.num_ngrams() == lm.num_ngrams()
    for ctx in CONTEXTS:
        for tok in TARGETS:
            assert back.logprob(ctx, tok) == lm.logprob(ctx, tok)


def test_arpa_round_trip(tmp_path):
    lm = train_ngram(corpus(7), 4, prune=(1, 2, 2), vocab_size=V)
    path = tmp_path / "lm.arpa"
    lm.write_arpa(path)
    text = path.read_text()
    assert "\\data\\\nngram 1=" in text and "\n-99.0000000\t<s>\t" in text and "\t<unk>\n" in text
    back = NgramLM.read_arpa(path)
    assert back.vocab_size == V and back.order == 4 and back.meta["tokens"] == lm.meta["tokens"]
    assert back.num_ngrams() == lm.num_ngrams()
    for ctx in CONTEXTS:
        for tok in TARGETS:
            assert math.exp(back.logprob(ctx, tok)) == pytest.approx(math.exp(lm.logprob(ctx, tok)), rel=1e-5)


def test_foreign_arpa_without_header(tmp_path):
    """A hand-written KenLM-style file: vocab_size from the largest id, backoffs applied."""
    path = tmp_path / "tiny.arpa"
    path.write_text(
        "\\data\\\nngram 1=5\nngram 2=2\n\n\\1-grams:\n-1.0\t<unk>\n-99\t<s>\t-0.3\n-0.5\t</s>\n"
        "-0.6\t0\t-0.2\n-0.7\t3\n\n\\2-grams:\n-0.1\t<s> 0\n-0.2\t0 3\n\n\\end\\\n"
    )
    lm = NgramLM.read_arpa(path)
    assert lm.vocab_size == 4 and lm.order == 2
    ln10 = math.log(10)
    assert lm.logprob([0], 3) == pytest.approx(-0.2 * ln10)
    assert lm.logprob([0], EOS) == pytest.approx((-0.2 - 0.5) * ln10)  # backoff(0) + p(</s>)
    assert lm.logprob([3], 1) == pytest.approx(-1.0 * ln10)  # unseen id: the <unk> floor


def test_training_input_errors():
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        train_ngram([[1, 7]], 2, vocab_size=5)
    with pytest.raises(ValueError, match="prune"):
        train_ngram([[1, 2]], 3, prune=(2,))
    with pytest.raises(ValueError, match="order"):
        train_ngram([[1, 2]], 0)
    with pytest.raises(BlockdraftError, match="too large"):
        train_ngram([[1, 2]], 4, vocab_size=60_000)


def test_corrupt_and_mismatched_npz(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(NgramFileError, match="junk.npz") as err:
        NgramLM.load(junk)
    assert isinstance(err.value, ValueError) and isinstance(err.value, BlockdraftError)
    assert "\n" not in str(err.value)
    good = tmp_path / "lm.npz"
    train_ngram(corpus(8), 3, vocab_size=V).save(good)
    with pytest.raises(NgramFileError, match="vocab_size 12, expected 13"):
        NgramLM.load(good, vocab_size=13)
    with np.load(good) as z:
        arrays = dict(z)
    arrays["keys3"] = arrays["keys3"][::-1].copy()
    np.savez(tmp_path / "unsorted.npz", **arrays)
    with pytest.raises(NgramFileError, match="corrupt 3-gram table"):
        NgramLM.load(tmp_path / "unsorted.npz")
    del arrays["lp2"]
    np.savez(tmp_path / "missing.npz", **arrays)
    with pytest.raises(NgramFileError, match="missing array"):
        NgramLM.load(tmp_path / "missing.npz")


GOOD_ARPA = (
    "\\data\\\nngram 1=3\nngram 2=1\n\n"
    "\\1-grams:\n-1\t<unk>\n-99\t<s>\t0\n-0.5\t</s>\n\n"
    "\\2-grams:\n-0.1\t<s> </s>\n\n"
    "\\end\\\n"
)


@pytest.mark.parametrize(
    "bad, message",
    [
        (GOOD_ARPA.replace("-0.1\t<s> </s>", "-0.1\t<s>"), r":11: expected 2 words"),
        (GOOD_ARPA.replace("-0.5\t</s>", "x\t</s>"), r":8: bad number"),
        (GOOD_ARPA.replace("ngram 2=1", "ngram 2=oops"), r":3: expected 'ngram 2=<count>'"),
        (GOOD_ARPA.replace("ngram 2=1", "ngram 2=2"), r":13: the 2-gram section has 1 entries"),
        (GOOD_ARPA.replace("\\end\\\n", ""), "truncated"),
        ("hello\n" + GOOD_ARPA, r":1: expected \\data\\"),
        (GOOD_ARPA.replace("-1\t<unk>\n", "").replace("1=3", "1=2"), "no <unk>"),
        (GOOD_ARPA.replace("<s> </s>", "<s> 5"), r":11: this 2-gram's suffix is not among the 1-grams"),
        (GOOD_ARPA.replace("<s> </s>", "<s> foo"), r":11: word is not an id: '-0.1\\t<s> foo'"),
        (GOOD_ARPA.replace("<s> </s>", "<s> <unk>"), r":11: word '<unk>' is not an id"),
        (GOOD_ARPA.replace("-0.5\t</s>", "-0.5\t-4"), r":8: word '-4' is not an id"),
    ],
)
def test_bad_arpa_lines(tmp_path, bad, message):
    path = tmp_path / "bad.arpa"
    path.write_text(bad)
    with pytest.raises(NgramFileError, match=message) as err:
        NgramLM.read_arpa(path)
    assert "\n" not in str(err.value)


def test_arpa_ids_beyond_the_given_vocabulary(tmp_path):
    path = tmp_path / "big.arpa"
    path.write_text(GOOD_ARPA.replace("-0.5\t</s>", "-0.5\t</s>\n-0.7\t9").replace("1=3", "1=4"))
    assert NgramLM.read_arpa(path).vocab_size == 10
    with pytest.raises(NgramFileError, match=r":9: id >= vocab_size 5"):
        NgramLM.read_arpa(path, vocab_size=5)
