"""Batches of similar-length sequences: the one padding rule every teacher-forced pass uses."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def length_batches(lengths: list[int], order: list[int], batch_tokens: int) -> list[list[int]]:
    """Groups of sequences (indices in `order`) of similar length, shortest first, whose padded
    size stays within batch_tokens (a longer sequence gets a group of its own)."""
    order = sorted(order, key=lambda i: lengths[i])
    out, i = [], 0
    while i < len(order):
        group = [order[i]]
        while i + len(group) < len(order) and (len(group) + 1) * lengths[order[i + len(group)]] <= batch_tokens:
            group.append(order[i + len(group)])
        out.append(group)
        i += len(group)
    return out


def right_padded(sequences: list[Sequence[int]]) -> torch.Tensor:
    """Token ids [B, longest], each sequence left-aligned and zero-padded on the right (causal
    attention never reads the padding, so each row's states are its own)."""
    batch = torch.zeros((len(sequences), max(len(x) for x in sequences)), dtype=torch.long)
    for r, x in enumerate(sequences):
        batch[r, : len(x)] = torch.as_tensor(x, dtype=torch.long)
    return batch
