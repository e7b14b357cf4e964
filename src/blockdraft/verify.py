"""Acceptance rules: pure functions of the tree and the target's outputs, no model calls."""
from __future__ import annotations

from typing import Mapping, Sequence

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


def accept_greedy(tree: TokenTree, target_tokens: torch.Tensor | Sequence[int]) -> Verdict:
    """Longest path whose every token equals the target's choice at its parent.

    target_tokens[n] is the target's choice after node n: its argmax ([N]), or under sampling
    anything indexable by node that draws the sampled token (read along the path only). Example: tree
    [root, a, b, d(parent a)] with target argmax [a, d, x, y] accepts root -> a -> d and the
    target's own next token after d is y: Verdict(path=[0, 1, 3], next_token=y).
    """
    choice = target_tokens.tolist() if isinstance(target_tokens, torch.Tensor) else target_tokens
    children = tree.children()
    path = [0]
    while (child := children[path[-1]].get(choice[path[-1]])) is not None:
        path.append(child)
    return Verdict(path=path, next_token=int(choice[path[-1]]))


def accept_sampled(tree: TokenTree, target_probs: torch.Tensor | Sequence[torch.Tensor], draft_probs: Mapping[int, torch.Tensor] | None = None,
                   generator: torch.Generator | None = None) -> Verdict:
    """Speculative sampling over a token tree: the committed tokens (path + next token) are
    distributed exactly as if each were sampled from the target in turn.

    target_probs[n] ([N, V], or anything indexable by node): the target's sampling distribution
    after node n.
    draft_probs[n] ([V]): the distribution node n's token was drawn from, given the siblings drawn
    before it; a node without one is a point mass (a deterministic draft: q = one-hot).

    Recursive rejection (SpecInfer, Miao et al. 2024; Chen et al. 2023 for a chain): at a node
    with target distribution p, try its children in order. Child x is accepted with probability
    min(1, p(x) / q(x)); a rejection replaces p by the residual norm((p - q)+), which for a
    point mass is p with x removed. The first accepted child becomes the node (p = its target
    distribution); when every child is rejected, the next token is drawn from the current p.
    Each stage outputs its p exactly, so the node does. The engine's drafts are point masses and
    it walks `accept_greedy` with sampled choices instead (the same acceptance probability, and
    the output does not depend on the drafts); this rule serves drafts drawn from a q.
    Example: one point-mass child x under p = [0.5 (x), 0.3, 0.2]: x with probability 0.5, else
    the next token from [0, 0.6, 0.4].
    """
    children = tree.child_nodes()
    path = [0]
    p = target_probs[0].double()
    while True:
        for child in children[path[-1]]:
            token = tree.tokens[child]
            q = draft_probs.get(child) if draft_probs is not None else None
            q_token = 1.0 if q is None else float(q[token])
            if float(torch.rand((), dtype=torch.float64, generator=generator)) * q_token < float(p[token]):
                path.append(child)
                p = target_probs[child].double()
                break
            p = residual(p, token, q)
        else:  # every child rejected (or a leaf): the target's own token from what is left of p
            return Verdict(path=path, next_token=int(torch.multinomial(p, 1, generator=generator)))


def residual(p: torch.Tensor, token: int, q: torch.Tensor | None = None) -> torch.Tensor:
    """norm((p - q)+): the target mass a rejected draft drawn from q (None: the point mass on
    `token`) did not cover. A rejection has probability 0 when nothing is left; p is kept then."""
    if q is None:
        left = p.clone()
        left[token] = 0.0
    else:
        left = (p - q.to(p.dtype)).clamp_min(0.0)
    total = left.sum()
    return left / total if total > 0 else p
