"""Global lattice rescoring: the p best paths of the heads' top-k lattice (Kim et al. 2024, sec. 6).

Path score = sum of head log-probs + alpha * sum of n-gram log-probs, the n-gram state starting
from the committed text. lm=None is the "p-best 0-gram" baseline (head scores alone), which
separates the gain of verifying many drafts from the gain of rescoring. The p drafts are merged
into one token tree by the engine and verified in a single forward.
"""
from __future__ import annotations

from .ngram import NgramLM
from .pbest import pbest_paths
from ..types import Lattice


class PBestRefiner:
    def __init__(self, lm: NgramLM | None, alpha: float, p: int, context_window: int = 8):
        self.lm, self.alpha, self.p = lm, alpha if lm is not None else 0.0, p
        self.context_window = context_window  # an n-gram state needs only the last order-1 ids

    def refine(self, lattice: Lattice | None, context: list[int]) -> list[list[int]]:
        if lattice is None:  # the drafter stopped before its first head: a plain step
            return []
        paths, _ = pbest_paths(lattice.tokens.numpy(), lattice.logprobs.double().numpy(), self.lm,
                               context[-self.context_window:], self.alpha, self.p)
        return paths.tolist()

    def accept(self, context: list[int]) -> None:
        pass
