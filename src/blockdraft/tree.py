"""Drafts -> one token tree (shared prefixes merged), verified by the target in ONE forward.

Node 0 is the root: the pending token (committed, not yet in the cache). A draft
[a, b, c] hangs below it as a chain; a second draft [a, d] shares node `a`:

    drafts [[a, b, c], [a, d]]  ->  tokens [root, a, b, c, d]
                                    parents [-1, 0, 1, 2, 1], depths [0, 1, 2, 3, 2]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenTree:
    tokens: list[int]  # [N] token of each node, node 0 = pending token
    parents: list[int]  # [N] parent node index, -1 for the root
    depths: list[int]  # [N] distance from the root

    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def children(self) -> list[dict[int, int]]:
        """children[node][token] -> child node (first one wins if a token repeats)."""
        kids: list[dict[int, int]] = [{} for _ in self.tokens]
        for node in range(1, self.size):
            kids[self.parents[node]].setdefault(self.tokens[node], node)
        return kids

    def child_nodes(self) -> list[list[int]]:
        """child_nodes[node] -> its children in node order, repeated tokens included (sampling tries each)."""
        kids: list[list[int]] = [[] for _ in self.tokens]
        for node in range(1, self.size):
            kids[self.parents[node]].append(node)
        return kids

    def ancestor_mask(self) -> torch.Tensor:
        """[N, N] bool: mask[i, j] is True when node j is node i or one of its ancestors."""
        n = self.size
        mask = torch.eye(n, dtype=torch.bool)
        for node in range(1, n):
            mask[node] |= mask[self.parents[node]]
        return mask


def build_tree(root: int, drafts: list[list[int]], max_nodes: int | None = None) -> TokenTree:
    """Merge drafts (best first) into a prefix tree below `root`, keeping at most max_nodes nodes."""
    tokens, parents, depths = [root], [-1], [0]
    index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    for draft in drafts:
        node = 0
        for token in draft:
            child = index.get((node, token))
            if child is None:
                if max_nodes is not None and len(tokens) >= max_nodes:
                    break
                child = len(tokens)
                index[(node, token)] = child
                tokens.append(int(token)); parents.append(node); depths.append(depths[node] + 1)
            node = child
    return TokenTree(tokens, parents, depths)
