"""Drafts from the context itself: answers often repeat what the prompt or the answer already said.

Prompt lookup (Saxena 2023; `prompt_lookup_num_tokens` in HF generate) finds the most recent
earlier place where the last n committed tokens occurred and proposes the tokens that followed
it. `ContextLookup` adds that draft to any other refiner's drafts (heads, p-best, neural), so one
tree verifies both in the step's single forward: the heads cover fresh text, the lookup covers
copied spans (names, code, quoted input), where the heads' fixed block size is too short.

The lookup's draft length adapts to what verification kept (more after a fully accepted draft,
less after a miss), because a long miss costs forward time and a long hit is the whole gain.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .types import Lattice
from .verify import common_prefix_length


def find_continuation(context: list[int] | np.ndarray, max_ngram: int = 3, min_ngram: int = 2,
                      length: int = 10) -> list[int]:
    """Tokens that followed the most recent earlier occurrence of the context's last n tokens.

    The longest n in [min_ngram, max_ngram] that matches wins; [] when none does.

    >>> find_continuation([5, 6, 7, 8, 9, 5, 6, 7], max_ngram=3, length=2)
    [8, 9]
    >>> find_continuation([1, 2, 3], min_ngram=2)
    []
    """
    ids = np.asarray(context, dtype=np.int64)
    for n in range(max_ngram, min_ngram - 1, -1):
        if len(ids) <= n:
            continue
        windows = sliding_window_view(ids[:-1], n)  # every earlier n-gram with a token after it
        hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return ids[start:start + length].tolist()
    return []


class ContextLookup:
    """Wraps a refiner (or none): its drafts plus one prompt-lookup draft of adaptive length."""

    def __init__(self, inner=None, max_ngram: int = 3, min_ngram: int = 2, min_length: int = 5,
                 max_length: int = 10):
        self.inner, self.max_ngram, self.min_ngram = inner, max_ngram, min_ngram
        self.min_length, self.max_length = min_length, max_length
        self.length = max_length
        self._last: tuple[int, list[int]] | None = None  # (context length, draft) of the last lookup

    def accept(self, context: list[int]) -> None:
        """Grow the length after a fully accepted lookup draft, shrink it to what was kept otherwise."""
        if self._last is not None:
            start, draft = self._last
            kept = common_prefix_length(draft, context[start:])
            self.length = min(self.max_length, self.length + 2) if kept == len(draft) else max(self.min_length, kept + 1)
            self._last = None
        if self.inner is not None:
            self.inner.accept(context)

    def refine(self, lattice: Lattice | None, context: list[int]) -> list[list[int]]:
        drafts = self.inner.refine(lattice, context) if self.inner is not None and lattice is not None else []
        found = find_continuation(context, self.max_ngram, self.min_ngram, self.length)
        if found:
            self._last = (len(context), found)
            drafts = drafts + [found]
        return drafts
