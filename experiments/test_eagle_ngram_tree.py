"""The n-gram-ranked eagle tree: at alpha 0 it is the shipped drafter's full-depth tree; at any
alpha the engine's output stays the model's greedy decode."""
import pytest
import torch

from blockdraft.eagle.drafter import EagleDrafter
from blockdraft.eagle.model import random_eagle
from blockdraft.engine import DecodeConfig, generate
from blockdraft.refine.base import TreeRefiner
from blockdraft.refine.ngram import train_ngram
from blockdraft.sizing import CostCurve
from blockdraft.target import TargetModel
from blockdraft.testing import reference_greedy, tiny_llama

from eagle_ngram_tree import NgramEagleDrafter  # experiments/ is on the path (pytest prepends it)


class _FullDepth(EagleDrafter):
    def _deeper_pays(self, scores, best_new):
        return True


def _setup(seed):
    model = tiny_llama(seed, torch.float64, layers=4, vocab=16)
    sizes = tuple(range(1, 65))
    cost = CostCurve(sizes, tuple(1.0 + 0.02 * (n - 1) for n in sizes))
    lm = train_ngram([[(seed + 3 * i + j) % 16 for i in range(20)] for j in range(5)], order=3, vocab_size=16)
    return model, random_eagle(model, seed), cost, lm


@pytest.mark.parametrize("seed", range(4))
def test_alpha_zero_drafts_the_shipped_full_depth_tree(seed):
    model, layer, cost, lm = _setup(seed)
    embed = model.get_input_embeddings().weight
    feats = torch.randn(12, 3 * 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ids = [(seed * 5 + 3 * i) % 16 for i in range(13)]
    trees = []
    for drafter in (_FullDepth(layer, embed, depth=4, cost=cost), NgramEagleDrafter(layer, embed, depth=4, cost=cost, lm=lm, alpha=0.0)):
        drafter.begin(feats[:8], ids[:9])
        trees.append([drafter.propose(feats[t:t + 1], ids[: t + 2]) for t in range(8, 12)])
    assert [t.paths if t else None for t in trees[0]] == [t.paths if t else None for t in trees[1]]
    for shipped, variant in zip(*trees):  # the shipped drafter sums scores in float32, the variant in float64
        assert shipped is None or variant.scores == pytest.approx(shipped.scores, rel=1e-6)
    assert any(trees[0])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("alpha", [0.5, 3.0])
def test_rescored_trees_keep_the_output_exact(seed, alpha):
    model, layer, cost, lm = _setup(seed)
    drafter = NgramEagleDrafter(layer, model.get_input_embeddings().weight, cost=cost, lm=lm, alpha=alpha)
    prompt = [(seed * 7 + 3 * i) % 16 for i in range(9)]
    got = generate(TargetModel(model), drafter, TreeRefiner(), prompt, DecodeConfig(max_new_tokens=30))
    assert got.ids == reference_greedy(model, prompt, 30)
