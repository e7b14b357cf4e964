"""Token n-gram LM over integer ids: interpolated modified Kneser-Ney, .npz / ARPA I/O, fast state stepping.

Ids. Real tokens are 0..V-1 (V = vocab_size). Callers name the sentence markers with the reserved
negative ids BOS = -1 and EOS = -2; every other id outside [0, V) means <unk>. Internally
<s> = V, </s> = V+1 and <unk> = V+2 (no n-gram of order >= 2 contains <unk>). An n-gram
(w1..wn) is packed into one int64 key, sum(w_i * B**(n-i)) with B = V+3, first word most
significant, so the extensions of a context form one contiguous run of a sorted key array and
lookups are `np.searchsorted`. All orders share one int64 key range, which needs
sum(B**n, n = 2..order) < 2**63 (order 4: V <= 55,105; order 3: V up to ~2M).

Model. Each sequence is scored as <s> w1 .. wm </s>. The unigram level interpolates with the
uniform distribution over the V ids and </s> (lmplz style), so an unseen id gets the finite
"floor" probability gamma_0 / (V+1), written to ARPA as <unk>. Probabilities are natural logs.
The tables are closed (every kept n-gram's prefix and suffix are kept), which makes the
longest context suffix of a history a complete LM state (KenLM's state minimisation).
"""
from __future__ import annotations

import gc
import json
import math
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import BlockdraftError

BOS = -1  # caller-side id of <s> (sentence start, never predicted)
EOS = -2  # caller-side id of </s>
FORMAT = "blockdraft-ngram/1"
LN10 = math.log(10.0)
ARPA_NEG_INF = -99.0  # ARPA's log10 "probability zero" for <s>
DISCOUNT_FALLBACK = (0.5, 1.0, 1.5)  # lmplz's --discount_fallback, for orders too sparse to estimate


class NgramFileError(BlockdraftError, ValueError):
    """A corrupt, mismatched or malformed n-gram file (one line, with the path / line number)."""


@dataclass(frozen=True)
class NgramStates:
    """A batch of minimised LM states: the longest suffix of each history that is a model context.

    `key` packs the state's `length` words; `cumbow[:, j]` is the sum of the log backoffs of the
    state's suffixes of length >= j, so backing off from an (l+1)-gram match costs cumbow[:, l+1].
    """

    length: np.ndarray  # [n] int64, 0..order-1
    key: np.ndarray  # [n] int64, 0 for the empty state
    cumbow: np.ndarray  # [n, order+1] float64

    def __len__(self) -> int:
        return len(self.length)

    def take(self, idx: np.ndarray) -> NgramStates:
        """The states at `idx` (a new batch; repeats allowed)."""
        return NgramStates(self.length[idx], self.key[idx], self.cumbow[idx])

    def codes(self) -> np.ndarray:
        """[n] int64 identity of each state: equal codes <=> the LM cannot tell the histories apart."""
        return self.key * self.cumbow.shape[1] + self.length


class NgramLM:
    """A backoff n-gram LM (the ARPA model) with vectorised scoring and state stepping.

    All n-grams of orders 2..N live in one sorted int64 table, order n shifted by offset[n] into
    its own disjoint range, so every level of a lookup is answered by a single searchsorted.
    """

    def __init__(
        self,
        order: int,
        vocab_size: int,
        uni_lp: np.ndarray,
        uni_bow: np.ndarray,
        uni_seen: np.ndarray,
        keys: list[np.ndarray],
        lp: list[np.ndarray],
        bow: list[np.ndarray],
        meta: dict | None = None,
    ):
        """Tables per order n = 2..order (list index n-2): sorted packed `keys`, `lp` (ln p) and
        `bow` (ln backoff, orders < `order` only); the unigram level is dense over the B internal ids."""
        _check_key_range(order, vocab_size)
        self.order = order
        self.vocab_size = vocab_size
        self.base = vocab_size + 3
        self.bos, self.eos, self.unk = vocab_size, vocab_size + 1, vocab_size + 2
        self.uni_lp = uni_lp.astype(np.float32)  # [B]
        self.uni_bow = uni_bow.astype(np.float32)  # [B]
        self.uni_seen = uni_seen.astype(bool)  # [B]
        self.meta = dict(meta or {})
        self.meta.update(order=order, vocab_size=vocab_size)
        self._pow = np.array([self.base**i for i in range(order + 1)], np.int64)  # [order+1]
        self._offset = _order_offsets(order, self.base)  # [order+1], orders 2..order used
        keys = [k.astype(np.int64) for k in keys]
        self.uni_ctx, ctx = _context_flags(keys, self.base, order)
        bow = list(bow) + [np.zeros(len(keys[-1]) if keys else 0)]  # the top order has no backoffs
        layout = [order] + list(range(2, order)) if order >= 2 else []  # offset order: N, then 2..N-1
        starts = np.cumsum([0] + [len(keys[n - 2]) for n in layout])
        self._span = {n: slice(int(starts[i]), int(starts[i + 1])) for i, n in enumerate(layout)}
        shifted = [k + self._offset[n] for n, k in enumerate(keys, start=2)]
        self._tab_key = _joint(shifted, layout, np.int64)  # [M] sorted
        self._tab_lp = _joint(lp, layout, np.float32)  # [M]
        self._tab_bow = _joint(bow, layout, np.float32)  # [M]
        self._tab_ctx = _joint(ctx, layout, bool)  # [M]
        self._pair_max: np.ndarray | None = None

    # ---- table access -------------------------------------------------------------------------

    def _lookup(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact match of offset keys (any shape; negative = no query): (found, position in the table)."""
        if len(self._tab_key) == 0:
            return np.zeros(q.shape, bool), np.zeros(q.shape, np.int64)
        pos = np.minimum(np.searchsorted(self._tab_key, q), len(self._tab_key) - 1)
        return self._tab_key[pos] == q, pos

    def _order_keys(self, n: int) -> np.ndarray:
        """[M_n] sorted packed keys of order n >= 2 (a fresh array)."""
        return self._tab_key[self._span[n]] - self._offset[n]

    def internal_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Caller ids -> internal ids: BOS/EOS -> <s>/</s>, anything else outside [0, V) -> <unk>."""
        a = np.asarray(ids, dtype=np.int64).reshape(-1)
        inside = np.where((a >= 0) & (a < self.vocab_size), a, self.unk)
        return np.where(a == BOS, self.bos, np.where(a == EOS, self.eos, inside))

    @property
    def floor_logprob(self) -> float:
        """ln p of an id never seen in training (the uniform share at the unigram level)."""
        return float(self.uni_lp[self.unk])

    def num_ngrams(self) -> list[int]:
        """Entries per order, counted as ARPA does (seen unigrams + <s> + </s> + <unk>)."""
        sizes = [self._span[n].stop - self._span[n].start for n in range(2, self.order + 1)]
        return [int(self.uni_seen.sum()) + 1] + sizes

    # ---- scoring ------------------------------------------------------------------------------

    def score_batch(self, histories: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """ln p(token | history) for [m, order-1] internal-id histories (left-padded with <unk>).

        Plain ARPA backoff: the longest stored suffix g+token, plus the backoffs of the history's
        suffixes longer than g. Independent of the state machinery (step_many), which it checks.
        """
        m, h = len(tokens), self.order - 1
        if h == 0:
            return self.uni_lp[tokens].astype(np.float64)
        ctx = np.zeros((m, h + 1), np.int64)  # [m, order] ctx[:, l]: packed l-word suffix of the history
        for l in range(1, h + 1):
            ctx[:, l] = histories[:, h - l] * self._pow[l - 1] + ctx[:, l - 1]
        lv = np.arange(1, h + 1)  # [h] context lengths
        found, pos = self._lookup(ctx[:, 1:] * self.base + tokens[:, None] + self._offset[lv + 1])  # [m, h]
        c_found, c_pos = self._lookup(ctx[:, 2:] + self._offset[lv[1:]])  # [m, h-1] contexts of length >= 2
        bows = np.zeros((m, h + 1))  # [m, order] ln bow of each suffix length
        bows[:, 1] = self.uni_bow[histories[:, h - 1]]
        bows[:, 2:] = np.where(c_found, self._tab_bow[c_pos], 0.0)
        best = (found * lv).max(axis=1)  # [m] longest matched context length
        top = pos[np.arange(m), np.maximum(best - 1, 0)]
        lp = np.where(best > 0, self._tab_lp[top], self.uni_lp[tokens])
        longer = np.arange(h + 1)[None, :] > best[:, None]  # [m, order]
        return lp + (bows * longer).sum(axis=1)

    def logprob(self, context: Sequence[int], token: int) -> float:
        """ln p(token | context); context holds committed ids (start it with BOS at a line start)."""
        if token == BOS:
            raise ValueError("<s> is never predicted (its probability is 0)")
        hist = self._history(context)
        return float(self.score_batch(hist[None, :], self.internal_ids([token]))[0])

    def score_sequence(self, tokens: Sequence[int], bos: bool = True, eos: bool = True) -> float:
        """Total ln p of a token sequence, KenLM-style: optionally after <s> and including </s>."""
        seq = np.concatenate([np.asarray(tokens, np.int64).reshape(-1), [EOS] if eos else []])
        return float(self.score_continuations([BOS] if bos else [], seq[None, :].astype(np.int64)).sum())

    def score_continuations(self, context: Sequence[int], paths: np.ndarray) -> np.ndarray:
        """ln p of every token of P continuations [P, L] of the same context: [P, L], one batched lookup."""
        paths = np.asarray(paths, dtype=np.int64)
        n_paths, length = paths.shape
        h = self.order - 1
        ctx = np.broadcast_to(self._history(context), (n_paths, h))
        seq = np.concatenate([ctx, self.internal_ids(paths).reshape(n_paths, length)], axis=1)  # [P, h+L]
        windows = np.lib.stride_tricks.sliding_window_view(seq, h + 1, axis=1)  # [P, L, h+1]
        flat = windows.reshape(n_paths * length, h + 1)
        return self.score_batch(flat[:, :h], flat[:, h]).reshape(n_paths, length)

    def _history(self, context: Sequence[int]) -> np.ndarray:
        """[order-1] internal ids of the context's tail, left-padded with <unk> (which matches nothing)."""
        h = self.order - 1
        tail = self.internal_ids(context[max(len(context) - h, 0) :] if h else [])
        return np.concatenate([np.full(h - len(tail), self.unk, np.int64), tail])

    # ---- state machinery ----------------------------------------------------------------------

    def begin(self, context: Sequence[int]) -> NgramStates:
        """The (single) state after the committed ids `context`: the longest suffix of its last
        order-1 ids that is a model context (context-ness is suffix-closed, so stop at the first miss)."""
        hist = self._history(context)  # [order-1]
        length, key, suffix_key = 0, 0, 0
        bw = np.zeros(self.order + 1)  # [order+1] ln bow of the state's suffix of each length
        for j in range(1, self.order):
            word = int(hist[-j])
            suffix_key += word * int(self._pow[j - 1])
            if j == 1:
                is_ctx, b = bool(self.uni_ctx[word]), self.uni_bow[word]
            else:
                found, pos = self._lookup(np.array([suffix_key + self._offset[j]]))
                is_ctx, b = bool(found[0] and self._tab_ctx[pos[0]]), self._tab_bow[pos[0]]
            if not is_ctx:
                break
            length, key, bw[j] = j, suffix_key, b
        cumbow = np.cumsum(bw[::-1])[::-1]
        return NgramStates(np.array([length]), np.array([key]), cumbow[None, :])

    def step(self, state: NgramStates, token: int) -> tuple[float, NgramStates]:
        """(ln p(token | state), next state) for one state."""
        lp, new = self.step_many(state, np.array([token]))
        return float(lp[0]), new

    def step_many(
        self, states: NgramStates, tokens: np.ndarray, internal: bool = False
    ) -> tuple[np.ndarray, NgramStates]:
        """Vectorised step: [n] states x [n] tokens -> (ln p [n], next states).

        One lookup of (state suffix + token) at every level. Tables are suffix-closed, so the
        matched levels (and the context ones among them) are always 1..count: counts suffice.
        """
        x = tokens if internal else self.internal_ids(tokens)  # [n]
        n, h = len(x), self.order - 1
        if h == 0:
            return self.uni_lp[x].astype(np.float64), self.empty_states(n)
        rows = np.arange(n)
        lv = np.arange(1, h + 1)  # [h] state-suffix lengths
        raw = (states.key[:, None] % self._pow[lv]) * self.base + x[:, None]  # [n, h] packed (suffix, x)
        q = np.where(states.length[:, None] >= lv, raw + self._offset[lv + 1], -1)
        found, pos = self._lookup(q)  # [n, h]
        matched = found.sum(axis=1)  # [n]
        top = pos[rows, np.maximum(matched - 1, 0)]
        lp = np.where(matched > 0, self._tab_lp[top], self.uni_lp[x]) + states.cumbow[rows, matched + 1]
        is_ctx = found & self._tab_ctx[pos]  # [n, h] (never at the top order)
        new_len = self.uni_ctx[x] + is_ctx.sum(axis=1)  # [n]
        new_key = np.where(new_len >= 2, raw[rows, np.maximum(new_len - 2, 0)], np.where(new_len == 1, x, 0))
        bw = np.zeros((n, h + 2))  # [n, order+1] ln bow of the new state's suffix of each length
        bw[:, 1] = self.uni_bow[x]
        bw[:, 2:] = np.where(is_ctx, self._tab_bow[pos], 0.0)
        cumbow = np.cumsum(bw[:, ::-1], axis=1)[:, ::-1]
        return lp, NgramStates(new_len.astype(np.int64), new_key.astype(np.int64), cumbow)

    def empty_states(self, n: int) -> NgramStates:
        """n copies of the no-context state (as after an unknown id)."""
        return NgramStates(np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros((n, self.order + 1)))

    # ---- search bounds ------------------------------------------------------------------------

    def pair_upper_bound(self, prev: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """[m] upper bound on ln p(token | h) over every history h ending in `prev`: the admissible
        per-transition bound that lets the lattice search prune without losing exactness."""
        a, b = self.internal_ids(prev), self.internal_ids(tokens)
        if self.order == 1:
            return self.uni_lp[b].astype(np.float64)
        pair_max, slack = self._pair_bound_tables()
        found, pos = self._lookup(a * self.base + b + self._offset[2])
        unseen = self.uni_lp[b].astype(np.float64) + self.uni_bow[a]
        idx = np.clip(pos - self._span[2].start, 0, max(len(pair_max) - 1, 0))
        return np.where(found, pair_max[idx] if len(pair_max) else 0.0, unseen) + slack

    def _pair_bound_tables(self) -> tuple[np.ndarray, float]:
        """Per bigram (a b), the max ln p over stored n-grams ending in (a b); plus the most that
        positive backoffs (absent from KN models) of longer contexts could add. Cached."""
        if self._pair_max is None:
            bigrams = self._order_keys(2)
            pair_max = self._tab_lp[self._span[2]].astype(np.float64)
            for n in range(3, self.order + 1):
                pos = np.searchsorted(bigrams, self._order_keys(n) % self._pow[2])
                np.maximum.at(pair_max, pos, self._tab_lp[self._span[n]])
            ctx_bows = np.concatenate([self._tab_bow[self._span[n]] for n in range(2, self.order)] + [np.zeros(1)])
            self._pair_max, self._slack = pair_max, (self.order - 2) * max(0.0, float(ctx_bows.max()))
        return self._pair_max, self._slack

    # ---- .npz I/O -----------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the tables and JSON metadata to exactly `path` (an .npz archive)."""
        arrays = {"uni_lp": self.uni_lp, "uni_bow": self.uni_bow, "uni_seen": self.uni_seen}
        for n in range(2, self.order + 1):
            arrays[f"keys{n}"], arrays[f"lp{n}"] = self._order_keys(n), self._tab_lp[self._span[n]]
            if n < self.order:
                arrays[f"bow{n}"] = self._tab_bow[self._span[n]]
        meta = dict(self.meta, format=FORMAT)
        with open(path, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path: str | Path, vocab_size: int | None = None) -> NgramLM:
        """Read a file written by save(); `vocab_size`, if given, must match the model's."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                order, v = _check_meta(str(path), meta)
                tables = {name: z[name] for name in z.files}
        except NgramFileError:
            raise
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
            raise NgramFileError(f"{path}: not a readable blockdraft n-gram file ({e})") from None
        if vocab_size is not None and vocab_size != v:
            raise NgramFileError(f"{path}: n-gram LM has vocab_size {v}, expected {vocab_size}")
        try:
            keys = [tables[f"keys{n}"] for n in range(2, order + 1)]
            lp = [tables[f"lp{n}"] for n in range(2, order + 1)]
            bow = [tables[f"bow{n}"] for n in range(2, order)]
            uni = [tables[name] for name in ("uni_lp", "uni_bow", "uni_seen")]
        except KeyError as e:
            raise NgramFileError(f"{path}: missing array {e} for an order-{order} model") from None
        _check_tables(str(path), order, v, uni, keys, lp, bow)
        return cls(order, v, *uni, keys, lp, bow, meta={k: x for k, x in meta.items() if k != "format"})

    # ---- ARPA I/O -----------------------------------------------------------------------------

    def write_arpa(self, path: str | Path) -> None:
        """Standard ARPA (log10, backoffs on contexts only); words are decimal ids, <s>, </s>, <unk>.
        A leading '#' comment carries vocab_size and the corpus size (KenLM skips such lines)."""
        names = [str(i) for i in range(self.vocab_size)] + ["<s>", "</s>", "<unk>"]
        with open(path, "w", encoding="ascii") as f, _gc_paused():
            f.write(f"# {FORMAT} {json.dumps(self.meta, sort_keys=True)}\n\n\\data\\\n")
            for n, count in enumerate(self.num_ngrams(), start=1):
                f.write(f"ngram {n}={count}\n")
            uni = np.concatenate([[self.unk], np.flatnonzero(self.uni_seen)])
            _write_section(f, 1, names, uni[:, None], self.uni_lp[uni], self.uni_bow[uni], self.uni_ctx[uni])
            for n in range(2, self.order + 1):
                span = self._span[n]
                words = _unpack(self._order_keys(n), n, self.base)  # [M, n]
                _write_section(f, n, names, words, self._tab_lp[span], self._tab_bow[span], self._tab_ctx[span])
            f.write("\n\\end\\\n")

    @classmethod
    def read_arpa(cls, path: str | Path, vocab_size: int | None = None) -> NgramLM:
        """Read an ARPA file with decimal-id words (ours or e.g. KenLM's lmplz on id text).

        vocab_size: from the argument, else our '#' header, else the largest id + 1.
        """
        with _gc_paused():
            header, raw = _parse_arpa(str(path))
            sections = [_parse_entries(str(path), sec, top=sec.n == len(raw)) for sec in raw]
        meta = header or {}
        v = vocab_size if vocab_size is not None else meta.get("vocab_size")
        if v is None:
            v = 1 + max(int(sec.words.max(initial=-1)) for sec in sections)
        order = len(sections)
        _check_key_range(order, v)
        meta.update(order=order, vocab_size=v)
        return cls(order, v, *_arpa_tables(str(path), v, sections), meta=meta)


def _joint(per_order: list[np.ndarray], layout: list[int], dtype) -> np.ndarray:
    """Concatenate per-order arrays (list index n-2) in the joint table's order layout."""
    return np.concatenate([per_order[n - 2] for n in layout]).astype(dtype) if layout else np.empty(0, dtype)


def _order_offsets(order: int, base: int) -> np.ndarray:
    """[order+1] offset of each order's keys in the joint table: order N at 0, then 2, 3, .. N-1."""
    offset = np.zeros(order + 1, np.int64)
    nxt = base**order
    for n in range(2, order):
        offset[n] = nxt
        nxt += base**n
    return offset


def _context_flags(keys: list[np.ndarray], base: int, order: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Which n-grams have an extension in the model, i.e. are states: dense for unigrams, then per
    order 2..N (always False at N). Prefixes of sorted keys are sorted, so no re-sort is needed."""
    uni = np.zeros(base, bool)
    flags = []
    for n in range(2, order + 1):
        if n == 2:
            uni[keys[0] // base] = True
        if n < order:
            prefixes = keys[n - 1] // base
            flag = np.zeros(len(keys[n - 2]), bool)
            flag[np.searchsorted(keys[n - 2], prefixes)] = True
            flags.append(flag)
    return uni, flags + ([np.zeros(len(keys[-1]), bool)] if keys else [])


def _unpack(keys: np.ndarray, n: int, base: int) -> np.ndarray:
    """[M] packed keys -> [M, n] internal ids."""
    return np.stack([(keys // base ** (n - 1 - i)) % base for i in range(n)], axis=1)


def _write_section(f, n: int, names: list[str], words: np.ndarray, lp, bow, ctx) -> None:
    """One ARPA \\n-grams: block; backoffs only where the n-gram is a context."""
    lp10 = np.where(np.isneginf(lp), ARPA_NEG_INF, lp / LN10).tolist()
    bow10 = (bow / LN10).tolist()
    f.write(f"\n\\{n}-grams:\n")
    for p, ws, b, c in zip(lp10, words.tolist(), bow10, ctx.tolist()):
        text = " ".join(names[w] for w in ws)
        f.write(f"{p:.7f}\t{text}\t{b:.7f}\n" if c else f"{p:.7f}\t{text}\n")


# ---- training -----------------------------------------------------------------------------------


def train_ngram(
    sequences: Iterable[Sequence[int]],
    order: int,
    prune: int | tuple[int, ...] = 0,
    vocab_size: int | None = None,
) -> NgramLM:
    """Interpolated modified Kneser-Ney (Chen & Goodman; lmplz's recipe), trained with numpy.

    sequences: token-id lines, each scored as <s> ids </s>.
    prune: minimum raw count to keep an n-gram of order >= 2; an int applies to all those orders,
        a tuple gives orders 2..order. Pruned n-grams' mass moves into their context's backoff,
        so every conditional distribution still sums to 1 (lmplz's scheme).
    vocab_size: V; default max id + 1.
    """
    seqs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences]
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    if not seqs:
        raise ValueError("cannot train an n-gram LM on zero sequences")
    body = np.concatenate(seqs)
    top = int(body.max()) if len(body) else -1
    v = top + 1 if vocab_size is None else int(vocab_size)
    if len(body) and (int(body.min()) < 0 or top >= v):
        raise ValueError(f"token ids must lie in [0, {v}); found {int(body.min())}..{top}")
    _check_key_range(order, max(v, 1))
    thresholds = _prune_thresholds(prune, order)
    flat, ends = _pad_corpus(seqs, v)
    base = v + 3
    keys, raw = zip(*[_count(flat, ends, n, base) for n in range(1, order + 1)])  # per order n-1
    adjusted = _adjusted_counts(list(keys), list(raw), order, base, bos=v)
    kept = _kept_masks(list(keys), list(raw), thresholds, base)
    discounts = [_discounts(a[keys[0] != v] if n == 0 else a) for n, a in enumerate(adjusted)]
    uni, probs, bows = _kn_probabilities(list(keys), adjusted, kept, discounts, v)
    meta = {
        "tokens": int(len(body)),
        "sentences": len(seqs),
        "discounts": [list(d) for d in discounts],
        "prune": list(thresholds),
    }
    return NgramLM(
        order,
        v,
        *uni,
        keys=[keys[n][kept[n]] for n in range(1, order)],
        lp=[np.log(p) for p in probs],
        bow=[np.log(b) for b in bows],
        meta=meta,
    )


def _check_key_range(order: int, vocab_size: int) -> None:
    """The joint key table holds B**n keys per order n >= 2 (B = V+3) in one int64 range."""
    if sum((vocab_size + 3) ** n for n in range(2, order + 1)) >= 2**63:
        raise BlockdraftError(
            f"vocab_size {vocab_size} is too large for int64 n-gram keys of order {order} "
            f"(order 4 allows V <= 55,105; use order 3)"
        )


def _prune_thresholds(prune: int | tuple[int, ...], order: int) -> tuple[int, ...]:
    """Per-order minimum raw counts, orders 1..order (unigrams are never pruned)."""
    per = (prune,) * (order - 1) if isinstance(prune, (int, np.integer)) else tuple(prune)
    if len(per) != order - 1 or any(int(t) < 0 for t in per):
        raise ValueError(f"prune must be an int >= 0 or {order - 1} such ints (orders 2..{order}), got {prune!r}")
    return (0,) + tuple(int(t) for t in per)


def _pad_corpus(seqs: list[np.ndarray], v: int) -> tuple[np.ndarray, np.ndarray]:
    """All sequences as <s> ids </s>, flattened [T], and the end (exclusive) of each position's line [T]."""
    lengths = np.array([len(s) + 2 for s in seqs], np.int64)
    line_end = np.cumsum(lengths)
    flat = np.empty(int(line_end[-1]), np.int64)
    starts = line_end - lengths
    body = np.ones(len(flat), bool)
    body[starts] = body[line_end - 1] = False
    flat[starts], flat[line_end - 1] = v, v + 1
    flat[body] = np.concatenate(seqs)
    return flat, np.repeat(line_end, lengths)


def _count(flat: np.ndarray, ends: np.ndarray, n: int, base: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted packed n-gram keys within lines [M] and their raw counts [M]."""
    start = np.flatnonzero(np.arange(len(flat)) + n <= ends)
    key = np.zeros(len(start), np.int64)
    for j in range(n):
        key = key * base + flat[start + j]
    return np.unique(key, return_counts=True)


def _adjusted_counts(keys: list, raw: list, order: int, base: int, bos: int) -> list[np.ndarray]:
    """KN counts: raw for the top order and for n-grams starting with <s>, else the number of
    distinct left extensions. The <s> unigram keeps its raw count (it is never predicted)."""
    adjusted = [r.astype(np.int64) for r in raw]
    for n in range(1, order):  # order n = index n-1
        suffix = keys[n] % base**n
        uniq, cont = np.unique(suffix, return_counts=True)
        pos = np.searchsorted(keys[n - 1], uniq)
        adjusted[n - 1][pos] = cont
    return adjusted


def _kept_masks(keys: list, raw: list, thresholds: tuple[int, ...], base: int) -> list[np.ndarray]:
    """Count pruning, then closure: every kept n-gram's prefix and suffix (n-1)-grams are kept."""
    kept = [r >= t for r, t in zip(raw, thresholds)]
    for n in range(len(keys) - 1, 0, -1):  # index n = order n+1
        if kept[n - 1].all():
            continue
        survivors = keys[n][kept[n]]
        for sub in (survivors // base, survivors % base**n):
            kept[n - 1][np.searchsorted(keys[n - 1], sub)] = True
    return kept


def _discounts(adjusted: np.ndarray) -> tuple[float, float, float]:
    """Modified KN D1, D2, D3+ from count-of-counts; lmplz's fallback where they are unusable."""
    t = [int(np.count_nonzero(adjusted == c)) for c in (1, 2, 3, 4)]
    if min(t) == 0:
        return DISCOUNT_FALLBACK
    y = t[0] / (t[0] + 2 * t[1])
    d = tuple(c - (c + 1) * y * t[c] / t[c - 1] for c in (1, 2, 3))
    return d if all(0 < x <= c for c, x in zip((1, 2, 3), d)) else DISCOUNT_FALLBACK


def _kn_probabilities(keys: list, adjusted: list, kept: list, discounts: list, v: int):
    """Interpolated probabilities order by order: p(x|h) = (a - D(a))/S(h) + gamma(h) p(x|h').

    Returns ((uni_p ln, uni_bow ln, uni_seen) dense [B]), per-order kept p [M_n] (orders 2..N),
    and per-order gamma on each kept n-gram that is a context (orders 2..N-1; 1 elsewhere).
    """
    base, order = v + 3, len(keys)
    words, a1 = keys[0], adjusted[0].astype(np.float64)
    predicted = words != v  # every unigram but <s>
    d1 = np.array((0.0,) + discounts[0])
    disc = d1[np.minimum(adjusted[0], 3)] * predicted
    total = a1[predicted].sum()
    gamma0 = disc.sum() / total
    uni_p = np.full(base, gamma0 / (v + 1))  # the uniform floor over V ids + </s>
    uni_p[words] += np.where(predicted, (a1 - disc) / total, 0.0)
    uni_p[v] = 0.0
    uni_bow = np.ones(base)
    uni_seen = np.zeros(base, bool)
    uni_seen[words] = True
    lower_p, lower_keys = uni_p, None
    probs, bows = [], []
    for n in range(1, order):  # index n = order n+1
        a, k = adjusted[n].astype(np.float64), kept[n]
        ctx = keys[n] // base
        group = np.concatenate([[0], np.cumsum(ctx[1:] != ctx[:-1])])  # [M] context index
        dn = np.array((0.0,) + discounts[n])[np.minimum(adjusted[n], 3)]
        denom = np.bincount(group, a)
        gamma = np.bincount(group, np.where(k, dn, a)) / denom  # pruned n-grams give all their mass
        suffix = keys[n][k] % base**n
        p_low = lower_p[suffix] if n == 1 else lower_p[np.searchsorted(lower_keys, suffix)]
        p = (a[k] - dn[k]) / denom[group[k]] + gamma[group[k]] * p_low
        has_kept = np.bincount(group, k) > 0
        ctx_keys = ctx[np.concatenate([[0], np.flatnonzero(ctx[1:] != ctx[:-1]) + 1])][has_kept]
        if n == 1:
            uni_bow[ctx_keys] = gamma[has_kept]
        else:
            bows[-1][np.searchsorted(lower_keys, ctx_keys)] = gamma[has_kept]
        probs.append(p)
        bows.append(np.ones(len(p)))
        lower_p, lower_keys = p, keys[n][k]
    with np.errstate(divide="ignore"):
        uni_lp = np.log(uni_p)  # <s> -> -inf
    return (uni_lp, np.log(uni_bow), uni_seen), probs, bows[:-1] if bows else []


# ---- file checks and ARPA parsing ---------------------------------------------------------------


def _check_meta(where: str, meta) -> tuple[int, int]:
    """The metadata object: format, order and vocab_size as positive integers, alpha as numbers >= 0."""
    if not isinstance(meta, dict):
        raise NgramFileError(f"{where}: metadata must be a JSON object, found {json.dumps(meta)[:40]}")
    if meta.get("format") != FORMAT:
        raise NgramFileError(f"{where}: format {meta.get('format')!r}, expected {FORMAT!r}")
    for key in ("order", "vocab_size"):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise NgramFileError(f"{where}: {key} must be a positive integer, found {json.dumps(value)[:40]}")
    alpha = meta.get("alpha", {})
    good = lambda a: isinstance(a, (int, float)) and not isinstance(a, bool) and np.isfinite(a) and a >= 0
    if not isinstance(alpha, dict) or not all(isinstance(k, str) and good(a) for k, a in alpha.items()):
        raise NgramFileError(f"{where}: alpha must map domains to numbers >= 0, found {json.dumps(alpha)[:60]}")
    return meta["order"], meta["vocab_size"]


def _check_tables(where: str, order: int, v: int, uni: list, keys: list, lp: list, bow: list) -> None:
    """Cheap structural checks of loaded arrays (shapes, dtypes, sorted in-range keys, log-probs
    <= 0 and never NaN, finite backoffs)."""
    base = v + 3
    for name, x in zip(("uni_lp", "uni_bow", "uni_seen"), uni):
        if x.ndim != 1 or len(x) != base:
            raise NgramFileError(f"{where}: {name} does not match vocab_size {v}")
    if uni[2].dtype != np.bool_:
        raise NgramFileError(f"{where}: uni_seen must be boolean, found {uni[2].dtype}")
    logprobs = [("uni_lp", uni[0])] + [(f"lp{n}", x) for n, x in enumerate(lp, start=2)]
    backoffs = [("uni_bow", uni[1])] + [(f"bow{n}", x) for n, x in enumerate(bow, start=2)]
    for name, x in logprobs + backoffs:
        if x.dtype.kind != "f" or x.ndim != 1:
            raise NgramFileError(f"{where}: {name} must be a 1-D float array, found {x.dtype} {list(x.shape)}")
        if np.isnan(x).any() or np.isposinf(x).any() or (name.startswith("bow") or name == "uni_bow") and np.isinf(x).any():
            raise NgramFileError(f"{where}: {name} holds NaN or inf values")
    for name, x in logprobs:
        if len(x) and x.max() > 1e-6:
            raise NgramFileError(f"{where}: {name} holds log-probabilities above 0 ({float(x.max()):.3g})")
    for n, (k, p) in enumerate(zip(keys, lp), start=2):
        b = bow[n - 2] if n < order else None
        bad = (
            k.dtype != np.int64
            or k.ndim != 1
            or len(p) != len(k)
            or (b is not None and len(b) != len(k))
            or (len(k) and (k[0] < 0 or k[-1] >= base**n or np.any(k[1:] <= k[:-1])))
        )
        if bad:
            raise NgramFileError(f"{where}: corrupt {n}-gram table")


@dataclass
class _Section:
    """The raw entry lines of one ARPA \\n-grams: block, with their line numbers."""

    n: int
    lines: list[str]
    linenos: list[int]


@dataclass
class _Entries:
    """One parsed section: words as caller-side ids (<s>/</s>/<unk> as BOS/EOS/_UNK_MARK)."""

    words: np.ndarray  # [M, n] int64
    lp10: np.ndarray  # [M] float64
    bow10: np.ndarray  # [M] float64 (0 where absent)
    linenos: list[int]


_UNK_MARK = -3  # <unk> while parsing ARPA, before vocab_size is known
_ARPA_SPECIAL = {"<s>": BOS, "</s>": EOS, "<unk>": _UNK_MARK}


@contextmanager
def _gc_paused():
    """Millions of live split-line lists make the cyclic GC rescan them over and over (5x slower)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _parse_arpa(where: str) -> tuple[dict | None, list[_Section]]:
    """ARPA text -> (our '#' header metadata or None, the raw lines of each n-gram section)."""
    header, counts, sections = None, [], []
    state, next_section = "preamble", "\\1-grams:"
    with open(where, encoding="utf-8", errors="replace") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if state == "grams" and line and line[0] != "\\":  # the hot path: an entry line
                sections[-1].lines.append(line)
                sections[-1].linenos.append(lineno)
            elif state == "preamble":
                if line.startswith(f"# {FORMAT} "):
                    try:
                        header = json.loads(line[len(FORMAT) + 3 :])
                    except json.JSONDecodeError:
                        raise NgramFileError(f"{where}:{lineno}: unreadable {FORMAT} header") from None
                elif line == "\\data\\":
                    state = "counts"
                elif line and not line.startswith("#"):
                    raise NgramFileError(f"{where}:{lineno}: expected \\data\\, got {line[:60]!r}")
            elif not line or state == "end":
                continue
            elif line == next_section and len(sections) < len(counts):
                _check_section_size(where, lineno, sections, counts)
                sections.append(_Section(len(sections) + 1, [], []))
                state, next_section = "grams", f"\\{len(sections) + 1}-grams:"
            elif state == "counts":
                counts.append(_parse_count(where, lineno, line, len(counts) + 1))
            elif line == "\\end\\" and len(sections) == len(counts):
                _check_section_size(where, lineno, sections, counts)
                state = "end"
            else:
                sections[-1].lines.append(line)
                sections[-1].linenos.append(lineno)
    if state != "end":
        raise NgramFileError(f"{where}: truncated ARPA file (no \\end\\ after {len(counts)} n-gram sections)")
    return header, sections


def _parse_count(where: str, lineno: int, line: str, n: int) -> int:
    """An 'ngram n=count' line of the \\data\\ block."""
    key, _, count = line.partition("=")
    if key.split() != ["ngram", str(n)] or not count.strip().isdigit():
        raise NgramFileError(f"{where}:{lineno}: expected 'ngram {n}=<count>', got {line[:60]!r}")
    return int(count)


def _check_section_size(where: str, lineno: int, sections: list[_Section], counts: list[int]) -> None:
    if sections and len(sections[-1].lines) != counts[len(sections) - 1]:
        n = len(sections)
        entries, announced = len(sections[-1].lines), counts[n - 1]
        raise NgramFileError(f"{where}:{lineno}: the {n}-gram section has {entries} entries, \\data\\ says {announced}")


def _parse_entries(where: str, sec: _Section, top: bool) -> _Entries:
    """Split and convert a section column by column (no per-line tuples: millions of lines)."""
    n, rows = sec.n, [line.split() for line in sec.lines]
    widths = np.array([len(r) for r in rows], np.int64)  # [M]
    bad = np.flatnonzero((widths != n + 1) & ((widths != n + 2) | top))
    if len(bad):
        i = int(bad[0])
        got = sec.lines[i][:60]
        raise NgramFileError(f"{where}:{sec.linenos[i]}: expected {n} words in a {n}-gram line, got {got!r}")
    lp10 = _column(where, sec, [r[0] for r in rows], float, "bad number")
    bow10 = _column(where, sec, [r[n + 1] if len(r) == n + 2 else "0" for r in rows], float, "bad number")
    words = np.empty((len(rows), n), np.int64)
    for j in range(n):
        col = [r[j + 1] for r in rows]
        special = np.fromiter((w in _ARPA_SPECIAL for w in col), bool, len(col))
        ids = _column(where, sec, [_ARPA_SPECIAL.get(w, w) for w in col], int, "word is not an id")
        bad = np.flatnonzero((~special & (ids < 0)) | ((ids == _UNK_MARK) & (n > 1)))
        if len(bad):
            i = int(bad[0])
            what = f"word {col[i]!r} is not an id, <s>, </s> or a unigram <unk>"
            raise NgramFileError(f"{where}:{sec.linenos[i]}: {what}")
        words[:, j] = ids
    return _Entries(words, lp10, bow10, sec.linenos)


def _column(where: str, sec: _Section, texts: list, kind: type, what: str) -> np.ndarray:
    """Convert one column with float() or int(); on failure, name the first bad line."""
    try:
        return np.fromiter(map(kind, texts), np.float64 if kind is float else np.int64, len(texts))
    except ValueError:
        for i, text in enumerate(texts):
            try:
                kind(text)
            except ValueError:
                raise NgramFileError(f"{where}:{sec.linenos[i]}: {what}: {sec.lines[i][:60]!r}") from None
        raise


def _arpa_tables(where: str, v: int, sections: list[_Entries]) -> tuple:
    """Parsed ARPA sections -> NgramLM table arguments, checking id range and closure."""
    base = v + 3
    to_internal = {BOS: v, EOS: v + 1, _UNK_MARK: v + 2}
    for sec in sections:
        too_big = np.flatnonzero((sec.words >= v).any(axis=1))
        if len(too_big):
            i = int(too_big[0])
            raise NgramFileError(f"{where}:{sec.linenos[i]}: id >= vocab_size {v}")
        for marker, internal in to_internal.items():
            sec.words[sec.words == marker] = internal
    uni = sections[0]
    ids = uni.words[:, 0]
    if not np.any(ids == v + 2):
        raise NgramFileError(f"{where}: no <unk> unigram, so unseen ids would have no probability")
    uni_lp = np.full(base, np.nan)
    uni_lp[ids] = np.where(uni.lp10 <= ARPA_NEG_INF, -np.inf, uni.lp10 * LN10)
    uni_bow = np.zeros(base)
    uni_bow[ids] = uni.bow10 * LN10
    uni_seen = ~np.isnan(uni_lp)
    uni_seen[v + 2] = False
    uni_lp[np.isnan(uni_lp)] = uni_lp[v + 2]
    keys, lps, bows = [], [], []
    for sec in sections[1:]:
        n = sec.words.shape[1]
        key = np.zeros(len(sec.words), np.int64)
        for j in range(n):
            key = key * base + sec.words[:, j]
        idx = np.argsort(key, kind="stable")
        key = key[idx]
        if np.any(key[1:] == key[:-1]):
            raise NgramFileError(f"{where}: duplicate {n}-gram entries")
        lower = np.flatnonzero(uni_seen) if n == 2 else keys[-1]
        for what, sub in (("prefix", key // base), ("suffix", key % base ** (n - 1))):
            pos = np.minimum(np.searchsorted(lower, sub), max(len(lower) - 1, 0))
            missing = np.flatnonzero(lower[pos] != sub) if len(lower) else np.arange(len(sub))
            if len(missing):
                line = sec.linenos[int(idx[missing[0]])]
                raise NgramFileError(
                    f"{where}:{line}: this {n}-gram's {what} is not among the {n - 1}-grams (not a closed backoff LM)"
                )
        keys.append(key)
        lps.append(sec.lp10[idx] * LN10)
        bows.append(sec.bow10[idx] * LN10)
    return uni_lp, uni_bow, uni_seen, keys, lps, bows[: len(sections) - 2]
