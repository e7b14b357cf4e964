"""Small data types passed between the stages of one decoding step (shapes in comments)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Lattice:
    """Top-k candidates of every draft position (position i is predicted by draft head i)."""

    tokens: torch.Tensor  # [K, k] long, best first in each row
    logprobs: torch.Tensor  # [K, k] float, log-softmax of the head's logits
    entropy: torch.Tensor | None = None  # [K] float, entropy (nats) of each head's full distribution

    @property
    def depth(self) -> int:
        return self.tokens.shape[0]


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying a token tree against the target's greedy choices."""

    path: list[int]  # tree node indices from the root (the pending token) to the last accepted node
    next_token: int  # the target's own token after the last accepted node (bonus or recovered)

    @property
    def n_accepted(self) -> int:
        return len(self.path) - 1


@dataclass
class StepStats:
    """What one target call did; metrics.py aggregates these."""

    drafted: int  # tokens in the longest draft (0 for plain decoding)
    tree_nodes: int  # tokens fed to the target this step, the pending token included
    accepted: int  # draft tokens accepted
    committed: int  # tokens committed this step (accepted + 1, less any truncation)
    forward_s: float  # target forward time
    draft_s: float  # drafter + refiner time (after the forward, for the next step)
    lattice: Lattice | None = None  # the lattice verified in this step (kept when asked for)
    draft: list[int] | None = None  # the first (best) draft verified in this step


@dataclass
class DecodeResult:
    ids: list[int]  # the new token ids (stop tokens included, stop strings trimmed)
    text: str
    steps: int  # target calls after the prefill
    stop_reason: str  # "eos", "stop_string", "max_new_tokens" or "context"
    prefill_s: float
    decode_s: float
    stats: list[StepStats] = field(default_factory=list)
    seed: int | None = None  # the sampler's seed (None: greedy decoding); reusing it repeats the output

    @property
    def new_tokens(self) -> int:
        return len(self.ids)

    @property
    def block_efficiency(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s


@dataclass(frozen=True)
class DraftTree:
    """A drafter's own tree of candidates (the eagle drafter): root-to-leaf token paths, best first."""

    paths: list[list[int]]  # each leaf's tokens after the pending one
    scores: list[float]  # each path's cumulative draft log-probability

    @property
    def depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)
