"""A transformers KV cache for batched generation that grows in place instead of by concatenation.

transformers' DynamicLayer appends each step's keys and values with `torch.cat`, copying the
whole cache every step: at 32 rows and ~300 cached positions that copy was a third of a
distillation step on the 2-core CPU (49 of 146 ms, torch profiler), and it grows with rows x
positions. Here each layer writes into a buffer with spare room (doubled when full) and hands
attention a view of the filled part, so a step copies only its new column.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """One layer's keys and values [rows, kv_heads, capacity, head_dim]; the first `length` positions are filled.

    Serves batched greedy generation only: what beam search and offloading would call raises
    instead of quietly acting on the views alone.
    """

    is_croppable = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.length = 0
        self.key_buffer = self.value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self.key_buffer is None or end > self.key_buffer.shape[-2]:
            self._grow(key_states, value_states, end)
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, end: int) -> None:
        """New buffers with room for twice `end` positions (at least 64), holding what is filled so far."""
        capacity = max(64, 2 * end)
        rows, heads, _, dim = key_states.shape
        keys = key_states.new_empty((rows, heads, capacity, dim))
        values = value_states.new_empty((rows, heads, capacity, value_states.shape[-1]))
        if self.length:
            keys[:, :, :self.length] = self.keys
            values[:, :, :self.length] = self.values
        self.key_buffer, self.value_buffer = keys, values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows `indices` (finished rows leave the batch); the spare room stays, unfilled."""
        if self.length:
            kept = []
            for buffer, filled in ((self.key_buffer, self.keys), (self.value_buffer, self.values)):
                rows = buffer.new_empty((len(indices), *buffer.shape[1:]))
                rows[:, :, :self.length] = filled[indices]
                kept.append(rows)
            self.key_buffer, self.value_buffer = kept
            self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("GrowingLayer serves batched greedy generation only; it does not crop")

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        raise NotImplementedError("GrowingLayer serves batched greedy generation only; no beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("GrowingLayer serves batched greedy generation only; no repeated rows")

    def offload(self) -> None:
        raise NotImplementedError("GrowingLayer keeps its buffers where they are; no offloading")

    def prefetch(self) -> None:
        raise NotImplementedError("GrowingLayer keeps its buffers where they are; no offloading")

    def place(self, slots: torch.Tensor, other: GrowingLayer) -> None:
        """Put `other`'s rows into rows `slots` (finished answers' rows). Rows end together on the
        right; the positions before a row's own are zeros, which the callers' attention masks hide
        (a zero, never uninitialised memory that could hold a NaN, is what a masked position
        multiplies)."""
        width = max(self.length, other.length)
        if width > self.length:  # the new rows are wider: shift every row right in new buffers
            keys = self.keys.new_zeros((*self.keys.shape[:2], max(64, 2 * width), self.keys.shape[-1]))
            values = self.values.new_zeros((*self.values.shape[:2], keys.shape[2], self.values.shape[-1]))
            keys[:, :, width - self.length:width] = self.keys
            values[:, :, width - self.length:width] = self.values
            self.key_buffer, self.value_buffer, self.length = keys, values, width
        start = width - other.length
        for buffer, rows_in in ((self.key_buffer, other.keys), (self.value_buffer, other.values)):
            buffer[slots, :, :start] = 0
            buffer[slots, :, start:width] = rows_in
        self.keys, self.values = self.key_buffer[:, :, :width], self.value_buffer[:, :, :width]

    def drop_left(self, positions: int) -> None:
        """Forget the first `positions` positions (padding that no remaining row attends to)."""
        self.key_buffer, self.value_buffer = self.key_buffer[:, :, positions:], self.value_buffer[:, :, positions:]
        self.length -= positions
        self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]


def unsupported(config) -> str | None:
    """Why a model's layers cannot use this cache (None when they can): it holds attention keys
    and values only (sliding-window layers keep every position; their masks still hide the far ones)."""
    kinds = set(getattr(config, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}
    return f"its {', '.join(sorted(kinds))} layers keep no attention cache" if kinds else None


def growing_cache(num_layers: int) -> Cache:
    """A cache of `num_layers` GrowingLayers for a model's forward (its `past_key_values`)."""
    return Cache(layers=[GrowingLayer() for _ in range(num_layers)])


def place_rows(cache: Cache, slots: torch.Tensor, other: Cache) -> None:
    """Put `other`'s rows into rows `slots` of `cache`, layer by layer (see GrowingLayer.place)."""
    for mine, theirs in zip(cache.layers, other.layers, strict=True):
        mine.place(slots, theirs)


def drop_left(cache: Cache, positions: int) -> None:
    """Drop the first `positions` cached positions of every layer."""
    for layer in cache.layers:
        layer.drop_left(positions)
