"""Speculative sampling over token trees is exact, and this test can tell when it is not.

A toy target over V = 5 tokens (a random table over the last two tokens, warped by
temperature / top-k / top-p) and a toy draft model near it. Each case decodes the first L = 3
tokens 4,000 times (seed i for sample i) through `verify.accept_sampled` with one way of
drafting (point-mass chains and trees, duplicate siblings, soft chains and trees sampled with
and without replacement, a merged tree) and compares the counts of the 125 continuations with
their exact probabilities, enumerated from the target, by Pearson's chi-square test. A correct
rule fails a case with probability ALPHA over the choice of seeds (the seeds are fixed, so the
outcome is too). Deliberately wrong rules (greedy matching with a sampled bonus, no residual,
siblings tested against a stale distribution, a drafter that reports a stale q) must fail the
same test with a p-value below ALPHA: the suite shows its own power.
"""
from __future__ import annotations

from collections import Counter
from itertools import product
from typing import Callable

import pytest
import torch

from blockdraft.sampling import Sampling
from blockdraft.testing import chi_square_pvalue, total_variation
from blockdraft.tree import TokenTree
from blockdraft.types import Verdict
from blockdraft.verify import accept_sampled, residual

V, L, PROMPT = 5, 3, (0, 1)
SAMPLES = 4_000
ALPHA = 1e-4


class ToyTarget:
    """p(next | context) from a random logit table over the last two tokens, warped by `sampling`;
    q(next | context): a draft model whose logits are the target's plus noise."""

    def __init__(self, sampling: Sampling, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        logits = 2.0 * torch.randn(V * V, V, generator=gen, dtype=torch.float64)
        self.table = sampling.probs(logits).view(V, V, V)
        noisy = logits + 1.5 * torch.randn(V * V, V, generator=gen, dtype=torch.float64)
        self.draft = torch.softmax(noisy, -1).view(V, V, V)

    def p(self, context: list[int]) -> torch.Tensor:
        return self.table[context[-2], context[-1]]

    def q(self, context: list[int]) -> torch.Tensor:
        return self.draft[context[-2], context[-1]]

    def exact(self) -> dict[tuple[int, ...], float]:
        """P(first L tokens) for every continuation, by the chain rule."""
        probs = {}
        for seq in product(range(V), repeat=L):
            ctx, prob = list(PROMPT), 1.0
            for token in seq:
                prob *= float(self.p(ctx)[token])
                ctx.append(token)
            probs[seq] = prob
        return probs


# ---- ways of drafting: (target, context, generator) -> nodes [(parent, token, q or None)], node 0 = root

Node = tuple[int, int, "torch.Tensor | None"]


def _sample(q: torch.Tensor, gen: torch.Generator) -> int:
    return int(torch.multinomial(q, 1, generator=gen))


def chain_point(t: ToyTarget, ctx: list[int], gen) -> list[Node]:
    """The draft model's argmax chain (like BPD heads): three point masses."""
    nodes, c = [], list(ctx)
    for i in range(3):
        x = int(t.q(c).argmax())
        nodes.append((i, x, None))
        c.append(x)
    return nodes


def tree_point_distinct(t: ToyTarget, ctx: list[int], gen) -> list[Node]:
    """The draft model's top-2 at the root and top-2 under the first (like p-best drafts, merged)."""
    a, b = t.q(ctx).topk(2).indices.tolist()
    c, d = t.q(ctx + [a]).topk(2).indices.tolist()
    return [(0, a, None), (0, b, None), (1, c, None), (1, d, None), (2, int(t.q(ctx + [b]).argmax()), None)]


def tree_point_duplicate(t: ToyTarget, ctx: list[int], gen) -> list[Node]:
    """Unmerged drafts: the same token twice at the root, then another, each with a child."""
    a, b = t.q(ctx).topk(2).indices.tolist()
    under = int(t.q(ctx + [a]).argmax())
    return [(0, a, None), (1, under, None), (0, a, None), (3, (under + 1) % V, None), (0, b, None)]


def chain_soft(t: ToyTarget, ctx: list[int], gen) -> list[Node]:
    """Three tokens sampled from the draft model, each with its distribution (Chen et al.'s chain)."""
    nodes, c = [], list(ctx)
    for i in range(3):
        q = t.q(c)
        x = _sample(q, gen)
        nodes.append((i, x, q))
        c.append(x)
    return nodes


def tree_soft_iid(t: ToyTarget, ctx: list[int], gen) -> list[Node]:
    """Three independent samples at the root (duplicates are likely), one sampled child each."""
    q, nodes = t.q(ctx), []
    for _ in range(3):
        x = _sample(q, gen)
        nodes.append((0, x, q))
        q2 = t.q(ctx + [x])
        nodes.append((len(nodes), _sample(q2, gen), q2))
    return nodes


def _tree_soft_distinct(t: ToyTarget, ctx: list[int], gen, renormalise: bool) -> list[Node]:
    q, nodes = t.q(ctx).clone(), []
    for _ in range(3):
        qi = q / q.sum()
        x = _sample(qi, gen)
        nodes.append((0, x, qi if renormalise else t.q(ctx)))
        q2 = t.q(ctx + [x])
        nodes.append((len(nodes), _sample(q2, gen), q2))
        q[x] = 0.0
    return nodes


def tree_soft_distinct(t: ToyTarget, ctx: list[int], gen) -> list[Node]:
    """Three samples without replacement at the root: each drawn from q with the earlier ones
    removed, and reported with that renormalised q (EAGLE-style distinct siblings)."""
    return _tree_soft_distinct(t, ctx, gen, renormalise=True)


def tree_soft_distinct_stale_q(t: ToyTarget, ctx: list[int], gen) -> list[Node]:
    """WRONG drafter: samples without replacement but reports the original q for every sibling."""
    return _tree_soft_distinct(t, ctx, gen, renormalise=False)


def tree_merged(t: ToyTarget, ctx: list[int], gen) -> list[Node]:
    """A point-mass chain (like a context lookup) merged with two soft samples at the root."""
    a = int(t.q(ctx).argmin())  # an unlikely point mass, so the soft siblings matter
    q = t.q(ctx)
    return [(0, a, None), (1, int(t.q(ctx + [a]).argmax()), None), (0, _sample(q, gen), q), (0, _sample(q, gen), q)]


# ---- acceptance rules: the right one is verify.accept_sampled; the wrong ones differ in one place


def accept_argmax_match(tree, target_probs, draft_probs=None, generator=None) -> Verdict:
    """WRONG: greedy verification with a sampled bonus (accept a child that is the target's argmax)."""
    children, path = tree.child_nodes(), [0]
    while True:
        p = target_probs[path[-1]].double()
        match = [c for c in children[path[-1]] if tree.tokens[c] == int(p.argmax())]
        if not match:
            return Verdict(path, int(torch.multinomial(p, 1, generator=generator)))
        path.append(match[0])


def _variant(name: str, siblings_see_residual: bool, bonus_from_residual: bool):
    """The recursive rule with the residual left out of the sibling tests and/or the final token."""

    def accept(tree, target_probs, draft_probs=None, generator=None) -> Verdict:
        children, path = tree.child_nodes(), [0]
        while True:
            first = p = target_probs[path[-1]].double()
            for child in children[path[-1]]:
                x, q = tree.tokens[child], (draft_probs or {}).get(child)
                test = p if siblings_see_residual else first
                if float(torch.rand((), dtype=torch.float64, generator=generator)) * (1.0 if q is None else float(q[x])) < float(test[x]):
                    path.append(child)
                    break
                p = residual(p, x, q)
            else:
                return Verdict(path, int(torch.multinomial(p if bonus_from_residual else first, 1, generator=generator)))

    accept.__name__ = name
    return accept


accept_without_residual = _variant("accept_without_residual", siblings_see_residual=False, bonus_from_residual=False)
accept_stale_siblings = _variant("accept_stale_siblings", siblings_see_residual=False, bonus_from_residual=True)


# ---- the test


def continuation(accept: Callable, target: ToyTarget, drafter: Callable, seed: int) -> tuple[int, ...]:
    """The first L tokens of one decode: steps of draft -> one tree -> accept, as in the engine."""
    gen = torch.Generator().manual_seed(seed)
    ctx, out = list(PROMPT), []
    while len(out) < L:
        nodes = drafter(target, ctx, gen)
        parents = [-1] + [parent for parent, _, _ in nodes]
        tokens = [ctx[-1]] + [token for _, token, _ in nodes]
        contexts, depths = [ctx], [0]
        for node in range(1, len(tokens)):
            contexts.append(contexts[parents[node]] + [tokens[node]])
            depths.append(depths[parents[node]] + 1)
        tree = TokenTree(tokens, parents, depths)
        target_probs = target.table[[c[-2] for c in contexts], [c[-1] for c in contexts]]
        draft_probs = {i + 1: q for i, (_, _, q) in enumerate(nodes) if q is not None}
        verdict = accept(tree, target_probs, draft_probs, gen)
        new = [tree.tokens[n] for n in verdict.path[1:]] + [verdict.next_token]
        ctx, out = ctx + new, out + new
    return tuple(out[:L])


def fit(accept: Callable, drafter: Callable, sampling: Sampling) -> tuple[float, float, float]:
    """(chi-square p-value, statistic, total variation) of SAMPLES decodes against the exact law."""
    target = ToyTarget(sampling)
    counts = Counter(continuation(accept, target, drafter, seed) for seed in range(SAMPLES))
    exact = target.exact()
    stat, _, pvalue = chi_square_pvalue(counts, exact)
    return pvalue, stat, total_variation(counts, exact)


def no_draft(t, ctx, gen) -> list[Node]:
    return []


DRAFTERS = [no_draft, chain_point, tree_point_distinct, tree_point_duplicate, chain_soft, tree_soft_iid,
            tree_soft_distinct, tree_merged]
WARM = Sampling(temperature=0.7, top_k=4)


@pytest.mark.parametrize("drafter", DRAFTERS, ids=lambda d: d.__name__)
def test_exact_for_every_way_of_drafting(drafter):
    pvalue, stat, tv = fit(accept_sampled, drafter, WARM)
    assert pvalue > ALPHA, f"{drafter.__name__}: chi2 {stat:.1f}, p = {pvalue:.2e}, TV {tv:.4f}"


@pytest.mark.parametrize("drafter,sampling", [
    (tree_point_distinct, Sampling(1.0)), (tree_soft_distinct, Sampling(1.3, top_p=0.8)),
    (tree_soft_iid, Sampling(0.5, top_k=2, top_p=0.9))], ids=["T1", "T1.3-p0.8", "T0.5-k2-p0.9"])
def test_exact_under_other_warps(drafter, sampling):
    pvalue, stat, tv = fit(accept_sampled, drafter, sampling)
    assert pvalue > ALPHA, f"{drafter.__name__}: chi2 {stat:.1f}, p = {pvalue:.2e}, TV {tv:.4f}"


WRONG = [
    (accept_argmax_match, chain_point), (accept_argmax_match, tree_point_distinct), (accept_argmax_match, chain_soft),
    (accept_without_residual, chain_point), (accept_without_residual, chain_soft), (accept_without_residual, tree_soft_iid),
    (accept_stale_siblings, tree_point_distinct), (accept_stale_siblings, tree_point_duplicate),
    (accept_stale_siblings, tree_soft_distinct), (accept_sampled, tree_soft_distinct_stale_q),
]


@pytest.mark.parametrize("accept,drafter", WRONG, ids=lambda f: f.__name__)
def test_a_wrong_rule_fails(accept, drafter):
    pvalue, stat, tv = fit(accept, drafter, WARM)
    assert pvalue < ALPHA, f"{accept.__name__} on {drafter.__name__} passed: chi2 {stat:.1f}, p = {pvalue:.2e}, TV {tv:.4f}"


def test_the_wrong_rules_differ_from_the_right_one_only_where_named():
    """With the residual restored in both places the variant IS verify.accept_sampled, draw for draw."""
    recursive = _variant("accept_recursive", siblings_see_residual=True, bonus_from_residual=True)
    target = ToyTarget(WARM)
    for drafter in (tree_point_duplicate, tree_soft_iid, tree_merged):
        for seed in range(100):
            assert continuation(recursive, target, drafter, seed) == continuation(accept_sampled, target, drafter, seed)


def test_stale_siblings_is_right_for_a_chain():
    """Sibling updates only matter with siblings: on a chain the stale-sibling rule is exact,
    so the tree cases above are what catch it."""
    pvalue, stat, tv = fit(accept_stale_siblings, chain_point, WARM)
    assert pvalue > ALPHA, f"chi2 {stat:.1f}, p = {pvalue:.2e}, TV {tv:.4f}"


def test_point_mass_rule_by_hand():
    """One point-mass child x under p = [0.5, 0.3, 0.2]: x half the time, else 0.6 / 0.4 for the others."""
    tree = TokenTree([9, 0], [-1, 0], [0, 1])
    probs = torch.tensor([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    counts = Counter()
    for _ in range(20_000):
        v = accept_sampled(tree, probs, None, gen)
        counts[tuple(tree.tokens[n] for n in v.path[1:]) + (v.next_token,)] += 1
    exact = {(0, 0): 0.5, (1,): 0.3, (2,): 0.2}
    assert chi_square_pvalue(counts, exact)[2] > ALPHA


def test_residual():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    assert torch.allclose(residual(p, 0), torch.tensor([0.0, 0.6, 0.4], dtype=torch.float64))
    q = torch.tensor([0.2, 0.6, 0.2], dtype=torch.float64)  # (p - q)+ = [0.3, 0, 0]
    assert torch.allclose(residual(p, 1, q), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.equal(residual(p, 1, p), p)  # nothing left: a rejection had probability 0


def test_the_exponential_race_draws_from_p_and_repeats_by_seed_and_position():
    """PositionNoise.choose is an exact draw from p (chi-square over seeds), never a token p rules
    out, the same token for the same (seed, position), and a wrong race (p times the noise) fails."""
    from blockdraft.sampling import PositionNoise

    p = torch.tensor([0.5, 0.3, 0.0, 0.15, 0.05])
    expected = {(x,): float(p[x]) for x in range(len(p))}
    draws = [PositionNoise(seed).choose(p, 3) for seed in range(SAMPLES)]
    assert chi_square_pvalue(Counter((x,) for x in draws), expected)[2] > ALPHA and 2 not in draws
    assert draws[:50] == [PositionNoise(seed).choose(p, 3) for seed in range(50)]
    assert draws[:50] != [PositionNoise(seed).choose(p, 4) for seed in range(50)]
    wrong = [int((p.double() * PositionNoise(seed).exponentials(3, len(p))).argmax()) for seed in range(SAMPLES)]
    assert chi_square_pvalue(Counter((x,) for x in wrong), expected)[2] < ALPHA
