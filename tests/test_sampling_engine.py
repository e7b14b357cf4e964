"""The decode loop samples exactly: every way of drafting leaves the target's distribution as it is.

A tiny random Llama over V = 8 tokens; each case decodes the first L = 3 tokens SAMPLES times
(seed i for run i) through `engine.generate` with one way of drafting: none, BPD heads
(point-mass chains), a lattice's top-2 tree (distinct siblings), drafts that follow the target's
own argmax (long accepted runs, the bonus token at the end of the tree) and context lookup. The
counts of the 512 continuations are compared with their exact probabilities, enumerated from
full forwards of the model, by Pearson's chi-square test (pooled cells below 5 expected). A
correct engine fails a case with probability ALPHA over the seeds (fixed, so the outcome is too).
A deliberately wrong acceptance rule swapped into the engine must fail the same test.
"""
from __future__ import annotations

from collections import Counter
from itertools import product

import pytest
import torch

from blockdraft import engine
from blockdraft.drafting import HeadsDrafter, NoDrafter
from blockdraft.engine import DecodeConfig, generate
from blockdraft.lookup import ContextLookup
from blockdraft.refine.base import ArgmaxRefiner
from blockdraft.sampling import Sampling
from blockdraft.target import TargetModel
from blockdraft.testing import chi_square_pvalue, random_heads, tiny_llama
from blockdraft.types import Lattice, Verdict
from blockdraft.verify import accept_greedy

V, L, PROMPT = 8, 3, [1, 5, 2, 5, 1, 5]
SAMPLES = 1_500
ALPHA = 1e-4
SETTINGS = {"T1": Sampling(temperature=1.0), "T0.7-top3": Sampling(temperature=0.7, top_k=3),
            "T1.3-p0.8": Sampling(temperature=1.3, top_p=0.8)}


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3, vocab=V)


@torch.inference_mode()
def exact(model, sampling: Sampling) -> dict[tuple[int, ...], float]:
    """P(first L tokens) for every continuation, by the chain rule over full forwards."""
    probs = {(): 1.0}
    for _ in range(L):
        longer = {}
        for seq, prob in probs.items():
            p = sampling.probs(model(input_ids=torch.tensor([PROMPT + list(seq)])).logits[0, -1:])[0]
            longer.update({seq + (x,): prob * float(p[x]) for x in range(V)})
        probs = longer
    return probs


class TopTwoTree:
    """Every path through the top-2 tokens of the lattice's first two rows: a tree of distinct siblings."""

    def refine(self, lattice: Lattice | None, context: list[int]) -> list[list[int]]:
        if lattice is None:
            return []
        rows = lattice.tokens[:2, :2].tolist()
        return [list(path) for path in product(*rows)]

    def accept(self, context: list[int]) -> None:
        pass


class TargetArgmax:
    """Drafts the target's own greedy continuation (3 tokens) and a branch from its second choice:
    drafts the target often accepts, so runs end at the tree's leaves and the bonus token is sampled."""

    def __init__(self, model):
        self.model = model

    @torch.inference_mode()
    def refine(self, lattice, context: list[int]) -> list[list[int]]:
        first = self.model(input_ids=torch.tensor([context])).logits[0, -1].topk(2).indices.tolist()
        drafts = []
        for start in first:
            ids = context + [start]
            for _ in range(2):
                ids.append(int(self.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            drafts.append(ids[len(context):])
        return drafts

    def accept(self, context: list[int]) -> None:
        pass


def drafting(name: str, model):
    heads = random_heads(model, 3, seed=1, chain=True)
    lm_head = model.get_output_embeddings()
    return {"ar": lambda: (NoDrafter(), ArgmaxRefiner()),
            "bpd-chain": lambda: (HeadsDrafter(heads, lm_head), ArgmaxRefiner()),
            "top2-tree": lambda: (HeadsDrafter(heads, lm_head, topk=2), TopTwoTree()),
            "target-argmax": lambda: (NoDrafter(), TargetArgmax(model)),
            "lookup": lambda: (HeadsDrafter(heads, lm_head), ContextLookup(ArgmaxRefiner(), min_length=2, max_length=4))}[name]()


def sample_counts(model, name: str, sampling: Sampling) -> tuple[Counter, float]:
    target = TargetModel(model)
    counts, tokens, steps = Counter(), 0, 0
    for i in range(SAMPLES):
        drafter, refiner = drafting(name, model)
        cfg = DecodeConfig(max_new_tokens=L, sampling=Sampling(sampling.temperature, sampling.top_k, sampling.top_p, i))
        result = generate(target, drafter, refiner, PROMPT, cfg)
        counts[tuple(result.ids)] += 1
        tokens, steps = tokens + result.new_tokens, steps + result.steps
    return counts, tokens / steps


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name", ["ar", "bpd-chain", "top2-tree", "target-argmax", "lookup"])
def test_engine_samples_the_target_distribution(model, name, setting):
    sampling = SETTINGS[setting]
    counts, block_efficiency = sample_counts(model, name, sampling)
    stat, df, pvalue = chi_square_pvalue(counts, exact(model, sampling))
    assert pvalue > ALPHA, f"{name} {setting}: chi2 {stat:.1f} on {df} df, p = {pvalue:.2e}"
    if name == "target-argmax":
        assert block_efficiency > 1.2  # the drafts were used: the test saw accepted runs


def greedy_match_with_sampled_bonus(tree, choices) -> Verdict:
    """A wrong rule: accept a draft token when it is the target's most likely one, then sample."""
    if isinstance(choices, torch.Tensor):  # greedy decoding: unchanged
        return accept_greedy(tree, choices)
    children, path = tree.children(), [0]
    while (child := children[path[-1]].get(int(choices.probs(path[-1]).argmax()))) is not None:
        path.append(child)
    return Verdict(path=path, next_token=choices[path[-1]])


def test_a_wrong_rule_in_the_engine_fails(model, monkeypatch):
    monkeypatch.setattr(engine, "accept_greedy", greedy_match_with_sampled_bonus)
    sampling = SETTINGS["T1"]
    counts, _ = sample_counts(model, "target-argmax", sampling)
    _, _, pvalue = chi_square_pvalue(counts, exact(model, sampling))
    assert pvalue < ALPHA


@pytest.mark.parametrize("setting", SETTINGS)
def test_every_drafting_samples_what_plain_sampling_samples(model, setting):
    """One seed, one output: drafts change how many tokens a step commits, never which."""
    target, sampling = TargetModel(model), SETTINGS[setting]
    accepted = 0
    for seed in range(40):
        cfg = DecodeConfig(max_new_tokens=16, sampling=Sampling(sampling.temperature, sampling.top_k, sampling.top_p, seed))
        plain = generate(target, *drafting("ar", model), PROMPT, cfg)
        for name in ("bpd-chain", "top2-tree", "target-argmax", "lookup"):
            drafted = generate(target, *drafting(name, model), PROMPT, cfg)
            assert drafted.ids == plain.ids, (name, seed)
            accepted += drafted.new_tokens - drafted.steps
    assert accepted > 100  # the drafts were accepted often: equal ids are not plain decoding's by default


def test_one_seed_one_output_and_greedy_unchanged(model):
    target = TargetModel(model)
    heads = random_heads(model, 3, seed=1, chain=True)

    def run(sampling: Sampling):
        drafter = HeadsDrafter(heads, model.get_output_embeddings())
        return generate(target, drafter, ArgmaxRefiner(), PROMPT, DecodeConfig(max_new_tokens=20, sampling=sampling))

    a, b = run(Sampling(0.9, seed=7)), run(Sampling(0.9, seed=7))
    assert a.ids == b.ids and a.seed == 7
    assert any(run(Sampling(0.9, seed=s)).ids != a.ids for s in range(8, 12))
    fresh = run(Sampling(0.9))
    assert fresh.seed is not None and run(Sampling(0.9, seed=fresh.seed)).ids == fresh.ids
    greedy = run(Sampling())
    assert greedy.seed is None and greedy.ids == generate(target, NoDrafter(), ArgmaxRefiner(), PROMPT,
                                                          DecodeConfig(max_new_tokens=20)).ids
