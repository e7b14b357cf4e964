"""Micro-benchmark of exact p-best lattice rescoring with a token n-gram LM (blockdraft.refine.pbest).

Trains a 4-gram on a synthetic Markov corpus (or loads one with --lm), then times pbest_paths on
lattices shaped like draft-head output: K positions x k distinct candidates, one of them the true
continuation of a held-out line (at a rank drawn near the top), head log-probs a sorted
Dirichlet(--dirichlet) sample (larger is flatter). Distractors are random ids, or with
--plausible the most frequent corpus followers of the previous position's top candidates: a
lattice dense with seen n-grams, where the search's bounds prune least (the hard case).

    .venv/bin/python experiments/pbest_microbench.py [--tokens 2000000] [--lm FILE] [--save FILE] [--plausible]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Callable

import numpy as np

from blockdraft.refine.ngram import NgramLM, train_ngram
from blockdraft.refine.pbest import pbest_paths

LINE = 64  # tokens per corpus line
SUCCESSORS = 8  # "preferred successors" per token, so that n-grams repeat


def synthetic_corpus(n_lines: int, vocab: int, rng: np.random.Generator) -> np.ndarray:
    """[n_lines, LINE] Zipf(1.1) unigrams plus a 55 % chance of a preferred successor of the previous token."""
    ranks = np.arange(1, vocab + 1)
    zipf = ranks**-1.1 / (ranks**-1.1).sum()
    succ = rng.choice(vocab, size=(vocab, SUCCESSORS), p=zipf)  # [V, 8]
    lines = np.empty((n_lines, LINE), np.int64)
    lines[:, 0] = rng.choice(vocab, size=n_lines, p=zipf)
    for t in range(1, LINE):
        fresh = rng.choice(vocab, size=n_lines, p=zipf)
        follow = succ[lines[:, t - 1], rng.integers(0, SUCCESSORS, n_lines)]
        lines[:, t] = np.where(rng.random(n_lines) < 0.55, follow, fresh)
    return lines


def corpus_followers(lines: np.ndarray, vocab: int) -> Callable[[int], np.ndarray]:
    """followers(a): the ids seen after id a in the corpus, most frequent first."""
    pairs, counts = np.unique(lines[:, :-1] * vocab + lines[:, 1:], return_counts=True)  # [P] sorted

    def followers(a: int) -> np.ndarray:
        lo, hi = np.searchsorted(pairs, [a * vocab, (a + 1) * vocab])
        return pairs[lo:hi][np.argsort(-counts[lo:hi], kind="stable")] % vocab

    return followers


def make_lattice(line, big_k: int, k: int, vocab: int, concentration: float, rng, followers=None):
    """(context, tokens [K, k], logprobs [K, k]): the true continuation hidden among k-1 distractors."""
    cut = int(rng.integers(8, LINE - big_k))
    context, truth = line[:cut].tolist(), line[cut : cut + big_k]
    tokens = np.empty((big_k, k), np.int64)
    logprobs = np.sort(np.log(rng.dirichlet(np.full(k, concentration), size=big_k) + 1e-9), axis=1)[:, ::-1]
    prev = [line[cut - 1]]
    for i, true_tok in enumerate(truth):
        pool = [f for a in prev for f in followers(a)[:6]] if followers else []
        pool = list(dict.fromkeys(pool + rng.choice(vocab, size=4 * k, replace=False).tolist()))
        others = [t for t in pool if t != true_tok][: k - 1]
        rank = min(int(rng.geometric(0.5)) - 1, k - 1)  # the head is right ~half the time
        tokens[i] = np.insert(rng.permutation(others), rank, true_tok)
        prev = tokens[i, :4]
    return context, tokens, np.ascontiguousarray(logprobs)


def time_calls(fn, cases) -> np.ndarray:
    """Per-call wall times in ms."""
    times = []
    for case in cases:
        t0 = time.perf_counter()
        fn(*case)
        times.append((time.perf_counter() - t0) * 1e3)
    return np.array(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2_000_000, help="synthetic training corpus size")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--order", type=int, default=4)
    ap.add_argument("--lm", help="load this .npz (NgramLM.save) instead of training")
    ap.add_argument("--save", help="save the trained LM here")
    ap.add_argument("--lattices", type=int, default=200)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--p", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--dirichlet", type=float, default=0.3, help="head log-prob concentration")
    ap.add_argument("--plausible", action="store_true", help="distractors that follow the previous candidates")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)

    n_lines = args.tokens // LINE
    lines = synthetic_corpus(n_lines + args.lattices, args.vocab, rng)
    train, held_out = lines[:n_lines], lines[n_lines:]
    t0 = time.perf_counter()
    if args.lm:
        lm = NgramLM.load(args.lm)
        print(f"loaded {args.lm} in {time.perf_counter() - t0:.2f} s: order {lm.order}, n-grams {lm.num_ngrams()}")
    else:
        lm = train_ngram(train, args.order, vocab_size=args.vocab)
        took = time.perf_counter() - t0
        print(f"trained order-{args.order} KN on {train.size:,} tokens in {took:.2f} s; n-grams {lm.num_ngrams()}")
        with tempfile.TemporaryDirectory() as tmp:
            path = args.save or os.path.join(tmp, "lm.npz")
            t0 = time.perf_counter()
            lm.save(path)
            t_save = time.perf_counter() - t0
            t0 = time.perf_counter()
            NgramLM.load(path)
            t_load = time.perf_counter() - t0
            print(f".npz: {os.path.getsize(path) / 2**20:.1f} MiB, save {t_save:.2f} s, load {t_load:.2f} s")

    followers = corpus_followers(train, args.vocab) if args.plausible else None
    cases = [make_lattice(line, args.K, args.k, args.vocab, args.dirichlet, rng, followers) for line in held_out]
    lm.pair_upper_bound(np.zeros(1, np.int64), np.zeros(1, np.int64))  # build the cached bound table
    kind = "plausible" if args.plausible else "random"
    for name, model, alpha in ((f"{lm.order}-gram", lm, args.alpha), ("0-gram", None, 0.0)):
        run = lambda ctx, tok, lp: pbest_paths(tok, lp, model, ctx, alpha, args.p)  # noqa: E731
        time_calls(run, cases[:10])  # warm-up
        ms = time_calls(run, cases)
        print(
            f"{name:>7} p={args.p} K={args.K} k={args.k} alpha={alpha} ({kind} distractors, "
            f"Dirichlet({args.dirichlet})): median {np.median(ms):.2f} ms, p90 {np.percentile(ms, 90):.2f} ms, "
            f"max {ms.max():.2f} ms over {len(ms)} lattices"
        )


if __name__ == "__main__":
    main()
