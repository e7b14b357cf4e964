"""FeatureDrafter: the feature head as a blockdraft drafter (engine.generate takes any drafter)."""
from __future__ import annotations

import torch

from blockdraft.drafting import ReadsLastHidden, entropy, top_candidates
from blockdraft.heads import top_chance
from blockdraft.types import Lattice

from .model import FeatureHead, KVCache


class FeatureDrafter(ReadsLastHidden):
    """The context-reading feature head (model.py): it first takes in the step's
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
        project, vocab = self.head.draft_rows.projection(self.head.draft_vocab, self.lm_head, dtype)
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
