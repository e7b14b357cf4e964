"""Local neural rescoring (Kim et al. 2024, sec. 6): a small causal LM re-ranks each head's top-k.

Left to right over the draft positions: z_j[S_j] += alpha * r_j[S_j], where z_j are head j's
scores on its top-k set S_j and r_j the rescorer's log-probs after the committed text and the
draft tokens chosen so far; the argmax is drafted. The rescorer keeps its own KV cache of the
committed text and rolls it back to the accepted prefix, so a step costs about K tiny forwards.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import DynamicCache

from ..errors import BlockdraftError
from ..target import cache_argument
from ..types import Lattice
from ..verify import common_prefix_length

META = "rescorer.json"


class Rescorer:
    """A small HF causal LM plus the cache of the text it has read."""

    def __init__(self, model: torch.nn.Module, alpha: dict[str, float]):
        self.model, self.alpha = model.eval().requires_grad_(False), alpha
        self.max_positions = getattr(model.config, "max_position_embeddings", 2048)
        self.ids: list[int] = []
        self.cache = None
        self.last: torch.Tensor | None = None  # [V] log-probs after self.ids
        self._cache_arg = cache_argument(model)

    @torch.inference_mode()
    def read(self, new: list[int]) -> torch.Tensor:
        """Append ids to the cache; returns log-probs after each of them [n, V]."""
        if self.cache is None:
            self.cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=torch.tensor([new]), use_cache=True, **{self._cache_arg: self.cache})
        self.ids += new
        return torch.log_softmax(out.logits[0].float(), dim=-1)

    def sync(self, context: list[int]) -> None:
        """Make the cache hold exactly `context` (crop to the shared prefix, read the rest)."""
        if len(context) >= self.max_positions:  # restart on a recent window
            context, self.ids, self.cache = context[-self.max_positions // 2:], [], None
        common = common_prefix_length(self.ids, context)
        if common == len(context) and common == len(self.ids) and self.last is not None:
            return
        common = min(common, len(context) - 1)  # re-read at least one token for fresh logits
        if self.cache is not None and common < len(self.ids):
            self.cache.crop(common - len(self.ids))
        self.ids = self.ids[:common]
        self.last = self.read(context[common:])[-1]

    def rollback(self, n: int) -> None:
        if n > 0:
            self.cache.crop(-n)
            self.ids = self.ids[:-n]


class NeuralRefiner:
    def __init__(self, rescorer: Rescorer, alpha: float):
        self.rescorer, self.alpha = rescorer, alpha

    def accept(self, context: list[int]) -> None:
        self.rescorer.sync(context)

    def refine(self, lattice: Lattice | None, context: list[int]) -> list[list[int]]:
        self.rescorer.sync(context)
        if lattice is None:  # the drafter stopped before its first head: a plain step
            return []
        scores, draft, logp = lattice.logprobs.float(), [], self.rescorer.last
        for j in range(lattice.depth):
            cand = lattice.tokens[j]  # [k]
            best = int(cand[(scores[j] + self.alpha * logp[cand]).argmax()])
            draft.append(best)
            if j + 1 < lattice.depth:
                logp = self.rescorer.read([best])[-1]
        self.rescorer.rollback(lattice.depth - 1)
        return [draft]


def load_rescorer(folder: str | Path, fingerprint: str | None = None, vocab_size: int | None = None) -> Rescorer:
    """Load a rescorer saved by `blockdraft train-rescorer`; refuse one made for another model, or a
    corrupt one (blockdraft.validate: JSON objects, complete weights, finite, the target's ids)."""
    from transformers import AutoModelForCausalLM

    from .. import validate

    folder = Path(folder)
    if not (folder / META).exists():
        raise BlockdraftError(f"no rescorer at {folder}: expected {META} (train one with `blockdraft train-rescorer`)")
    meta = validate.json_object(folder / META)
    alpha = meta.get("alpha", {"default": 1.0})
    if not isinstance(alpha, dict) or not all(validate.number_at_least(a, 0.0) for a in alpha.values()):
        raise validate.fault(folder / META, f"alpha must map domains to numbers >= 0, found {json.dumps(alpha)[:60]}")
    validate.model_folder(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise BlockdraftError(f"corrupt rescorer at {folder}: {validate.first_line(exc)}") from None
    validate.finite(model.named_parameters(), folder)
    rows = model.get_output_embeddings().weight.shape[0]
    if vocab_size is not None and rows < vocab_size:
        raise BlockdraftError(f"rescorer at {folder} scores {rows} token ids, fewer than the model's {vocab_size}")
    if fingerprint and meta.get("base_fingerprint") not in (None, fingerprint):
        raise BlockdraftError(f"rescorer at {folder} was trained for another model ({meta.get('base_model')})")
    return Rescorer(model, alpha)
