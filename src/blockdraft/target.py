"""The target (base) model: one forward per step, and the only owner of the KV cache.

Cache invariant (checked by the tests after every step): the cache holds the first
len(committed) - 1 tokens of prompt + generated text. The last committed token is *pending*:
each step feeds it, followed by the draft tree, in one call; `commit` then keeps the pending
token and the accepted nodes, and the target's own next token becomes the new pending token.

Two interchangeable bodies run the decoder: transformers' own forward with its DynamicCache
(any causal LM), and blockdraft.fastpath's lean forward for Llama-family models on CPU.
"""
from __future__ import annotations

import inspect
import time

import torch

from .cpu import EXACT_ROWS
from .errors import BlockdraftError
from .tree import TokenTree


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword a HF model takes its KV cache by: `cache` in transformers >= 5.2x, else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class TransformersBody:
    """The decoder through transformers' own forward and DynamicCache: works for any causal LM."""

    name = "transformers"

    def __init__(self, model: torch.nn.Module):
        self.model, self.body = model, model.get_decoder()
        self.cache = None
        self._cache_arg = cache_argument(self.body)

    @property
    def length(self) -> int:
        return self.cache.get_seq_length() if self.cache is not None else 0

    def reserve(self, positions: int) -> None:
        """DynamicCache grows by itself; nothing to size."""

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor | None,
                 layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final hidden states [N, H] of `tokens` [N] at `positions` [N], appended to the cache, and
        the outputs of decoder `layers`, concatenated [N, len(layers) * H] (None without layers)."""
        kwargs = {self._cache_arg: self.cache}
        if allowed is not None:  # a float mask: transformers' 4D form, 0 = attend
            dtype = self.model.get_output_embeddings().weight.dtype
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
            kwargs["attention_mask"] = mask[None, None].to(tokens.device)
        out = self.body(input_ids=tokens[None], position_ids=positions[None], use_cache=True,
                        output_hidden_states=bool(layers), **kwargs)
        # hidden_states[0] is the embedding output, [i + 1] the output of layer i (the last one normed)
        kept = torch.cat([out.hidden_states[i + 1][0] for i in layers], -1) if layers else None
        return out.last_hidden_state[0], kept

    def cache_dtype(self) -> torch.dtype:
        return self.model.dtype

    def crop(self, tokens: int) -> None:
        self.cache.crop(-tokens)

    def keep(self, past: int, nodes: list[int]) -> None:
        index = torch.tensor(list(range(past)) + [past + n for n in nodes], device=self.model.device)
        for layer in self.cache.layers:
            if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
                raise BlockdraftError("token-tree verification needs a plain dynamic KV cache (no sliding window)")
            layer.keys = layer.keys.index_select(-2, index)
            layer.values = layer.values.index_select(-2, index)


TREE_SLACK = 256  # cache positions a step's draft tree may hold beyond the committed ones


class TargetModel:
    """Adapter over an unmodified Hugging Face CausalLM whose logits are lm_head(final hidden).

    fast_path=True runs Llama-family models on CPU through blockdraft.fastpath (same logits,
    less time per step); other models, or fast_path=False, run through transformers.
    """

    def __init__(self, model: torch.nn.Module, fast_path: bool = True, lm_head: torch.nn.Module | None = None,
                 cache_capacity: int = 512):
        """lm_head: a stand-in for the model's output projection with the same weights (a private
        oneDNN-packed copy), so that the caller's model itself is left as it is. cache_capacity:
        the fast path's first KV-cache size in positions (it doubles when a request needs more)."""
        from .fastpath import LlamaFastPath, unsupported

        self.model = model
        self.body = model.get_decoder()
        self.lm_head = lm_head if lm_head is not None else model.get_output_embeddings()
        self.max_positions = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self.runner = LlamaFastPath(model, cache_capacity) if fast_path and unsupported(model) is None else TransformersBody(model)
        self.calls = 0  # forwards since the last reset, the prefill included

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def path(self) -> str:
        """Which body runs the decoder ("llama-fastpath" or "transformers"): part of cost-curve keys."""
        return self.runner.name

    @property
    def cache_dtype(self) -> torch.dtype:
        """The KV cache's dtype (the fast path keeps a bfloat16 model's in float32 where its
        attention stays exact so): part of cost-curve keys."""
        return self.runner.cache_dtype()

    @property
    def cache_length(self) -> int:
        return self.runner.length

    def reset(self) -> None:
        self.runner.reset()
        self.calls = 0

    @torch.inference_mode()
    def prefill(self, ids: list[int], reserve: int = 0, layers: tuple[int, ...] | None = None
                ) -> tuple[float, torch.Tensor | None]:
        """Fill the cache with `ids` (the prompt without its last token); returns seconds and, where
        `layers` is given, the states a drafter reads of `ids` (see `forward`). reserve: the
        positions the whole request may take (prompt + budget), sized once so that memory does not
        grow, nor the cache get copied, while the answer is written."""
        self.runner.reserve(min(reserve, self.max_positions) + TREE_SLACK if reserve else 0)
        self.reset()
        began, states = time.perf_counter(), None
        if ids:
            hidden, kept = self.runner(torch.tensor(ids, device=self.device),
                                       torch.arange(len(ids), device=self.device), None, layers or ())
            states = None if layers is None else kept if layers else hidden
            self.calls += 1
        return time.perf_counter() - began, states

    @torch.inference_mode()
    def forward(self, tree: TokenTree, layers: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ONE target call over the tree; returns logits [N, V] and the states a drafter reads [N, S]:
        the final hidden states (layers None or empty), else the outputs of those decoder layers,
        concatenated (S = len(layers) * H)."""
        past, dev = self.cache_length, self.device
        allowed = None  # a chain is plain causal attention
        if not tree.is_chain:  # causal within the tree = attend to ancestors only
            allowed = torch.cat([torch.ones(tree.size, past, dtype=torch.bool), tree.ancestor_mask()], dim=1).to(dev)
        positions = torch.tensor(tree.depths, device=dev) + past
        hidden, kept = self.runner(torch.tensor(tree.tokens, device=dev), positions, allowed, layers or ())
        self.calls += 1
        # At most EXACT_ROWS rows per product: past them, bfloat16 kernels change with the row
        # count, and a node's logits must not depend on how many nodes share the call
        # (cpu.EXACT_ROWS, tests/test_fastpath.py)
        logits = torch.cat([self.lm_head(rows) for rows in hidden.split(EXACT_ROWS)])
        return logits, kept if layers else hidden

    def rollback(self, tokens: int) -> None:
        """Drop the last `tokens` cached positions (an answer cut short inside a block)."""
        if tokens > 0:
            self.runner.crop(tokens)

    @torch.inference_mode()
    def commit(self, tree: TokenTree, path: list[int]) -> None:
        """Keep only the path's nodes (root first) of the tree just verified in the cache."""
        drop = tree.size - len(path)
        if path == list(range(len(path))):  # a prefix of the fed tokens: crop by length
            if drop:
                self.runner.crop(drop)
            return
        self.runner.keep(self.cache_length - tree.size, path)
