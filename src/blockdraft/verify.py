"""Acceptance rules: pure functions of the tree and the target's outputs, no model calls."""
from __future__ import annotations

import torch

from .tree import TokenTree
from .types import Verdict


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share: `common_prefix_length([1, 2, 3], [1, 2, 4])` is 2."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def accept_greedy(tree: TokenTree, target_tokens: torch.Tensor | list[int]) -> Verdict:
    """Longest path whose every token equals the target's greedy choice at its parent.

    target_tokens[n] is the target's argmax after node n ([N]). Example: tree
    [root, a, b, d(parent a)] with target argmax [a, d, x, y] accepts root -> a -> d and the
    target's own next token after d is y: Verdict(path=[0, 1, 3], next_token=y).
    """
    choice = target_tokens.tolist() if isinstance(target_tokens, torch.Tensor) else list(target_tokens)
    children = tree.children()
    path = [0]
    while (child := children[path[-1]].get(choice[path[-1]])) is not None:
        path.append(child)
    return Verdict(path=path, next_token=int(choice[path[-1]]))
