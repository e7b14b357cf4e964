"""Drafters turn the state after a step into a lattice of candidates for the next block.

A drafter reads the final hidden states of the positions the step committed (already computed
by the step's single target forward; BPD heads use the last one) and the committed ids; it
never calls the target.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .feature_head import FeatureHead, KVCache
from .heads import DraftHeads, draft_projection, top_chance
from .types import Lattice


class Drafter(Protocol):
    def propose(self, hidden: torch.Tensor, context: list[int]) -> Lattice | None:
        """hidden [N, H] at the step's committed nodes (the pending token and the accepted draft
        tokens, oldest first); context = prompt + committed ids, whose last N came after them."""
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


class FeatureDrafter:
    """The context-reading feature head (blockdraft.feature_head): it first takes in the step's
    committed positions (its KV cache grows with the answer), then drafts one token at a time."""

    def __init__(self, head: FeatureHead, lm_head: torch.nn.Module, topk: int = 1, num_heads: int | None = None,
                 with_entropy: bool = False, stop_below: float = 0.0):
        self.head, self.lm_head, self.topk = head, lm_head, topk
        self.num_heads = min(num_heads or head.num_heads, head.num_heads)
        self.with_entropy = with_entropy
        self.stop_below = stop_below  # adaptive draft size, as for HeadsDrafter
        self.cache: KVCache | None = None  # the head's keys and values of every committed position
        self.length = 0

    @torch.inference_mode()
    def propose(self, hidden: torch.Tensor, context: list[int]) -> Lattice | None:
        embed, n = self.lm_head.weight, hidden.shape[0]
        dtype = self.head.fc.weight.dtype
        if self.cache is None and self.head.config.prompt_context and len(context) > n + 1:
            self._read_prompt(context[: len(context) - n])
        feats, self.cache = self.head(hidden[None], embed[context[-n:]][None], self.length, self.cache)
        self.length += n
        project, vocab = draft_projection(self.head, self.lm_head, dtype)
        feature, past, rows, full, chance = feats[:, -1:], self.cache, [], [], 1.0
        for j in range(self.num_heads):
            row = project(feature[0])[0]  # [V']: the guess of the token after the next one
            if self.stop_below:
                chance *= float(top_chance(row))
                if chance < self.stop_below:
                    break
            rows.append(row)
            if self.with_entropy:
                full.append(self.lm_head(feature[0, 0].to(embed.dtype)))
            if j + 1 < self.num_heads:  # feed the guess back in, after the committed positions
                best = int(row.argmax()) if vocab is None else int(vocab[int(row.argmax())])
                feature, past = self.head(feature, embed[best][None, None], self.length + j, past)
        if not rows:
            return None
        lattice = top_candidates(torch.stack(rows), vocab, self.topk)
        if full:
            lattice = Lattice(lattice.tokens, lattice.logprobs, entropy(torch.stack(full)))
        return lattice

    def _read_prompt(self, prompt: list[int]) -> None:
        """The prompt before its last token, as in training: position s reads [e(x[s]); e(x[s+1])]."""
        ids = torch.tensor(prompt, device=self.lm_head.weight.device)
        rows = self.lm_head.weight[ids]
        _, self.cache = self.head(rows[None, :-1], rows[None, 1:], 0, None)
        self.length = len(prompt) - 1


def top_candidates(logits: torch.Tensor, vocab: torch.Tensor | None, topk: int) -> Lattice:
    """Draft logits [K, V'] (columns = `vocab` ids, or all ids) -> the lattice of their top-k."""
    top = torch.log_softmax(logits.float(), dim=-1).topk(topk, dim=-1)
    tokens = top.indices if vocab is None else vocab[top.indices]
    return Lattice(tokens=tokens.cpu(), logprobs=top.values.cpu())


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Analysis: entropy (nats) of each row of full-vocabulary logits [K, V] -> [K], on the CPU."""
    logp = torch.log_softmax(logits.float(), -1)
    return (-(logp.exp() * logp).sum(-1)).cpu()
