"""Batches of similar-length sequences: the one padding rule every teacher-forced pass uses."""
from __future__ import annotations


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
