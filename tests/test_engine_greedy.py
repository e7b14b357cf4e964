"""Losslessness: every decode path returns exactly the target's own greedy ids."""
import random

import pytest
import torch

from blockdraft.drafting import HeadsDrafter, NoDrafter
from blockdraft.engine import DecodeConfig, generate
from blockdraft.refine.base import ArgmaxRefiner
from blockdraft.target import TargetModel
from blockdraft.testing import FixedDepthDrafter, ScriptedRefiner, random_heads, reference_greedy


def _prompt(seed: int, length: int = 7) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(64) for _ in range(length)]


class CacheWatch:
    """on_commit hook asserting the cache invariant after every step."""

    def __init__(self, target: TargetModel, prompt_len: int):
        self.target, self.total = target, prompt_len

    def __call__(self, new):
        self.total += len(new)
        assert self.target.cache_length == self.total - 1


def _run(model, drafter, refiner, prompt, max_new, stop_ids=(), fast_path=True):
    target = TargetModel(model, fast_path=fast_path)
    watch = CacheWatch(target, len(prompt))
    result = generate(target, drafter, refiner, prompt, DecodeConfig(max_new_tokens=max_new, stop_ids=stop_ids),
                      on_commit=watch)
    assert target.calls == result.steps + (1 if len(prompt) > 1 else 0)  # one forward per step
    assert sum(s.committed for s in result.stats) == result.new_tokens
    assert all(1 <= s.committed <= s.accepted + 1 <= s.drafted + 1 for s in result.stats)
    return result


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_heads", [1, 2, 4, 8])
@pytest.mark.parametrize("fast_path", [True, False], ids=["llama-fastpath", "transformers"])
def test_random_heads_match_greedy(tiny_models, dtype, seed, num_heads, fast_path):
    model = tiny_models(seed, dtype)
    prompt, max_new = _prompt(seed), 23  # 23: not a multiple of any block size
    want = reference_greedy(model, prompt, max_new)
    drafter = HeadsDrafter(random_heads(model, num_heads, seed), model.get_output_embeddings())
    got = _run(model, drafter, ArgmaxRefiner(), prompt, max_new, fast_path=fast_path)
    assert got.ids == want


@pytest.mark.parametrize("seed", range(3))
def test_plain_decoding_is_one_token_per_step(tiny_models, seed):
    model = tiny_models(seed)
    prompt = _prompt(seed)
    got = _run(model, NoDrafter(), ArgmaxRefiner(), prompt, 17)
    assert got.ids == reference_greedy(model, prompt, 17)
    assert got.steps == 17 and got.block_efficiency == 1.0


@pytest.mark.parametrize("depth", [1, 2, 4, 8])
@pytest.mark.parametrize("seed", range(3))
def test_scripted_chains_every_acceptance_length(tiny_models, depth, seed):
    model = tiny_models(seed)
    prompt, max_new = _prompt(seed), 21
    want = reference_greedy(model, prompt, max_new)
    for wrong_at in [None, *range(depth)]:
        refiner = ScriptedRefiner(len(prompt), want, depth, 64, [wrong_at])
        got = _run(model, FixedDepthDrafter(depth), refiner, prompt, max_new)
        assert got.ids == want
        accepted = depth if wrong_at is None else wrong_at
        assert all(s.accepted == min(accepted, s.drafted) for s in got.stats[1:])
    # fully right drafts commit depth + 1 per step (the last step may be cut by the budget)
    oracle = _run(model, FixedDepthDrafter(depth), ScriptedRefiner(len(prompt), want, depth, 64), prompt, max_new)
    assert all(s.committed == depth + 1 for s in oracle.stats[1:-1])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fast_path", [True, False], ids=["llama-fastpath", "transformers"])
def test_token_trees_with_duplicate_and_partial_branches(tiny_models, seed, dtype, fast_path):
    model = tiny_models(seed, dtype)
    prompt, max_new, depth = _prompt(seed), 25, 5
    want = reference_greedy(model, prompt, max_new)
    rng = random.Random(seed)
    for _ in range(6):
        wrong = [rng.choice([None, 0, 1, 2, 3, 4]) for _ in range(rng.randint(2, 5))]
        wrong.append(wrong[0])  # a duplicate branch
        refiner = ScriptedRefiner(len(prompt), want, depth, 64, wrong)
        got = _run(model, FixedDepthDrafter(depth), refiner, prompt, max_new, fast_path=fast_path)
        assert got.ids == want
        best = depth if None in wrong else max(wrong)
        assert all(s.accepted == min(best, s.drafted) for s in got.stats[1:])


@pytest.mark.parametrize("seed", range(4))
def test_stop_token_inside_a_block(tiny_models, seed):
    model = tiny_models(seed)
    prompt = _prompt(seed)
    free = reference_greedy(model, prompt, 30)
    stop = free[len(free) // 2]
    want = reference_greedy(model, prompt, 30, stop_ids=(stop,))
    refiner = ScriptedRefiner(len(prompt), free, 6, 64)
    got = _run(model, FixedDepthDrafter(6), refiner, prompt, 30, stop_ids=(stop,))
    assert got.ids == want and got.stop_reason == "eos" and got.ids[-1] == stop


@pytest.mark.parametrize("max_new", [1, 2, 5, 9, 10, 11])
def test_budget_ends_mid_block(tiny_models, max_new):
    model = tiny_models(1)
    prompt = _prompt(1)
    want = reference_greedy(model, prompt, max_new)
    refiner = ScriptedRefiner(len(prompt), reference_greedy(model, prompt, 40), 4, 64)
    got = _run(model, FixedDepthDrafter(4), refiner, prompt, max_new)
    assert got.ids == want and got.new_tokens == max_new and got.stop_reason == "max_new_tokens"


def test_single_token_prompt_and_context_limit(tiny_models):
    model = tiny_models(2)
    limit = model.config.max_position_embeddings
    prompt = _prompt(2, limit - 6)
    refiner = ScriptedRefiner(len(prompt), reference_greedy(model, prompt, 5), 4, 64)
    got = _run(model, FixedDepthDrafter(4), refiner, prompt, 50)
    assert got.stop_reason == "context" and len(prompt) + got.new_tokens == limit
    assert got.ids == reference_greedy(model, prompt, got.new_tokens)
    one = _run(model, NoDrafter(), ArgmaxRefiner(), [5], 4)
    assert one.ids == reference_greedy(model, [5], 4)
