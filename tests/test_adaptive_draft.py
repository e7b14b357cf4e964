"""Adaptive draft size: a draft ends where the heads' own chance of its chain drops below a bar."""
import random

import pytest
import torch

from blockdraft.drafting import HeadsDrafter
from blockdraft.engine import DecodeConfig, generate
from blockdraft.refine.base import ArgmaxRefiner
from blockdraft.target import TargetModel
from blockdraft.testing import random_heads, reference_greedy


def _chain_chance(logits: torch.Tensor) -> list[float]:
    return torch.softmax(logits.double(), -1).amax(-1).cumprod(0).tolist()


@pytest.mark.parametrize("chain", [False, True])
def test_stopped_draft_is_the_confident_prefix_of_the_full_draft(tiny_models, chain):
    model = tiny_models(1, torch.float64)
    heads = random_heads(model, 6, seed=2, chain=chain)
    lm_head = model.get_output_embeddings()
    for trial in range(20):
        hidden = torch.randn(model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(trial)) * 3
        full, _ = heads.draft_logits(hidden, lm_head, next_token=trial)
        chance = _chain_chance(full)
        cut = 1 + trial % (len(chance) - 1)  # a bar between two rows' chances: rows before it kept
        bar = (chance[cut - 1] * chance[cut]) ** 0.5
        kept, _ = heads.draft_logits(hidden, lm_head, next_token=trial, stop_below=bar)
        expected = next((i for i, c in enumerate(chance) if c < bar), len(chance))
        assert len(kept) == expected
        torch.testing.assert_close(kept, full[:expected])


def test_no_confident_head_means_no_draft(tiny_models):
    model = tiny_models(0, torch.float32)
    drafter = HeadsDrafter(random_heads(model, 3, chain=True), model.get_output_embeddings(), stop_below=1.01)
    assert drafter.propose(torch.zeros(1, model.config.hidden_size), [1, 2, 3]) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chain", [False, True])
@pytest.mark.parametrize("stop_below", [0.02, 0.1, 0.3])
def test_adaptive_drafts_stay_greedy(tiny_models, dtype, seed, chain, stop_below):
    model = tiny_models(seed, dtype)
    prompt = [random.Random(seed).randrange(64) for _ in range(7)]
    drafter = HeadsDrafter(random_heads(model, 5, seed, chain=chain), model.get_output_embeddings(), stop_below=stop_below)
    got = generate(TargetModel(model), drafter, ArgmaxRefiner(), prompt, DecodeConfig(max_new_tokens=21))
    assert got.ids == reference_greedy(model, prompt, 21)
