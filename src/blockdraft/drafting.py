"""Drafters turn the state after a step into a lattice of candidates for the next block.

A drafter reads the final hidden states of the positions the step committed (already computed
by the step's single target forward; BPD heads use the last one) and the committed ids; it
never calls the target.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .heads import DraftHeads
from .types import Lattice


class Drafter(Protocol):
    # The target states the drafter reads: None, the final hidden state of each step's committed
    # nodes (nothing of the prompt); a tuple, the outputs of those decoder layers, concatenated,
    # for the prompt (`begin`) and for each step's committed nodes (`propose`).
    layers: tuple[int, ...] | None

    def begin(self, states: torch.Tensor | None, prompt: list[int]) -> None:
        """A new answer: the prompt's states [P - 1, S] (all but its last, pending token; None when
        `layers` is None)."""
        ...

    def propose(self, hidden: torch.Tensor, context: list[int]) -> Lattice | None:
        """hidden [N, H] at the step's committed nodes (the pending token and the accepted draft
        tokens, oldest first); context = prompt + committed ids, whose last N came after them."""
        ...


class ReadsLastHidden:
    """Base of drafters that read only the final hidden state of each step's committed nodes."""

    layers: tuple[int, ...] | None = None

    def begin(self, states: torch.Tensor | None, prompt: list[int]) -> None:
        pass


class NoDrafter(ReadsLastHidden):
    """Plain autoregressive decoding: an empty draft, so each step commits one token."""

    def propose(self, hidden: torch.Tensor, context: list[int]) -> Lattice | None:
        return None


class HeadsDrafter(ReadsLastHidden):
    """BPD heads on the hidden state: the top-k of each draft head is one lattice row."""

    def __init__(self, heads: DraftHeads, lm_head: torch.nn.Module, topk: int = 1, num_heads: int | None = None,
                 with_entropy: bool = False, stop_below: float = 0.0):
        self.heads, self.lm_head, self.topk = heads, lm_head, topk
        self.num_heads = min(num_heads or heads.num_heads, heads.num_heads)
        self.with_entropy = with_entropy
        self.stop_below = stop_below  # adaptive draft size: see DraftHeads.draft_logits

    @torch.inference_mode()
    def propose(self, hidden: torch.Tensor, context: list[int]) -> Lattice | None:
        hidden = hidden[-1]
        logits, vocab = self.heads.draft_logits(hidden, self.lm_head, context[-1], self.num_heads, self.stop_below)
        if not len(logits):
            return None  # not even the first head is likely enough: a plain step
        lattice = top_candidates(logits, vocab, self.topk)
        if self.with_entropy:
            entropy = self._entropy(hidden, [context[-1]] + lattice.tokens[:, 0].tolist())
            lattice = Lattice(lattice.tokens, lattice.logprobs, entropy)
        return lattice

    def _entropy(self, hidden: torch.Tensor, chain: list[int]) -> torch.Tensor:
        """Analysis: each head's entropy over the full vocabulary (chained heads read the drafted chain)."""
        k = self.heads.num_heads
        before = torch.tensor((chain + [0] * k)[:k])[None]
        return entropy(self.heads.logits(hidden[None], self.lm_head, before)[0, : self.num_heads])


def top_candidates(logits: torch.Tensor, vocab: torch.Tensor | None, topk: int) -> Lattice:
    """Draft logits [K, V'] (columns = `vocab` ids, or all ids) -> the lattice of their top-k."""
    top = torch.log_softmax(logits.float(), dim=-1).topk(topk, dim=-1)
    tokens = top.indices if vocab is None else vocab[top.indices]
    return Lattice(tokens=tokens.cpu(), logprobs=top.values.cpu())


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Analysis: entropy (nats) of each row of full-vocabulary logits [K, V] -> [K], on the CPU."""
    logp = torch.log_softmax(logits.float(), -1)
    return (-(logp.exp() * logp).sum(-1)).cpu()
