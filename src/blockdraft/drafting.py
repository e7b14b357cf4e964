"""Drafters turn the state after a step into a lattice of candidates for the next block.

A drafter reads the final hidden state at the last accepted position (already computed by
the step's single target forward) and the committed ids; it never calls the target.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .heads import DraftHeads
from .types import Lattice


class Drafter(Protocol):
    def propose(self, hidden: torch.Tensor, context: list[int]) -> Lattice | None:
        """hidden [H] at the last accepted node; context = prompt + committed ids."""
        ...


class NoDrafter:
    """Plain autoregressive decoding: an empty draft, so each step commits one token."""

    def propose(self, hidden: torch.Tensor, context: list[int]) -> Lattice | None:
        return None


class HeadsDrafter:
    """BPD heads on the hidden state: the top-k of each draft head is one lattice row."""

    def __init__(self, heads: DraftHeads, lm_head: torch.nn.Module, topk: int = 1, num_heads: int | None = None,
                 with_entropy: bool = False, stop_below: float = 0.0):
        self.heads, self.lm_head, self.topk = heads, lm_head, topk
        self.num_heads = min(num_heads or heads.num_heads, heads.num_heads)
        self.with_entropy = with_entropy
        self.stop_below = stop_below  # adaptive draft size: see DraftHeads.draft_logits

    @torch.inference_mode()
    def propose(self, hidden: torch.Tensor, context: list[int]) -> Lattice | None:
        logits, vocab = self.heads.draft_logits(hidden, self.lm_head, context[-1], self.num_heads, self.stop_below)
        if not len(logits):
            return None  # not even the first head is likely enough: a plain step
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [K, V']
        top = logprobs.topk(self.topk, dim=-1)
        tokens = top.indices if vocab is None else vocab[top.indices]
        entropy = self._entropy(hidden, [context[-1]] + tokens[:, 0].tolist()) if self.with_entropy else None
        return Lattice(tokens=tokens.cpu(), logprobs=top.values.cpu(), entropy=entropy)

    def _entropy(self, hidden: torch.Tensor, chain: list[int]) -> torch.Tensor:
        """Analysis: each head's entropy over the full vocabulary (chained heads read the drafted chain)."""
        k = self.heads.num_heads
        before = torch.tensor((chain + [0] * k)[:k])[None]
        full = torch.log_softmax(self.heads.logits(hidden[None], self.lm_head, before)[0, : self.num_heads].float(), -1)
        return (-(full.exp() * full).sum(-1)).cpu()  # [K]
