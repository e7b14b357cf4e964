"""Context lookup drafts, draft vocabularies and the default `fast` method: still exactly greedy."""
import pytest
import torch

from blockdraft.drafting import HeadsDrafter, NoDrafter
from blockdraft.engine import DecodeConfig, generate
from blockdraft.heads import load_heads
from blockdraft.lookup import ContextLookup, find_continuation
from blockdraft.refine.base import ArgmaxRefiner
from blockdraft import sizing
from blockdraft.sizing import CostCurve, cached_cost_curve
from blockdraft.target import TargetModel
from blockdraft.testing import random_heads, reference_greedy, tiny_decoder


def test_find_continuation_prefers_the_longest_then_the_latest_match():
    ids = [1, 2, 3, 9, 9, 7, 2, 3, 4, 5, 1, 2, 3]
    assert find_continuation(ids, max_ngram=3, min_ngram=1, length=2) == [9, 9]  # "1 2 3" beats "2 3"
    assert find_continuation([4, 2, 3, 5, 6, 2, 3, 7, 2, 3], max_ngram=2, length=3) == [7, 2, 3]  # latest
    assert find_continuation([1, 2, 3, 4], max_ngram=3, min_ngram=2) == []
    assert find_continuation([5, 6, 5, 6], max_ngram=2, length=10) == [5, 6]  # never the tail itself
    assert find_continuation([7], max_ngram=3, min_ngram=1) == []


def test_lookup_length_adapts_to_what_was_kept():
    lookup = ContextLookup(min_length=2, max_length=8)
    lookup.length = 4
    context = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3]
    assert lookup.refine(None, context) == [[4, 5, 6, 7]]
    lookup.accept(context + [4, 5, 6, 7, 8])  # all four kept -> longer
    assert lookup.length == 6
    context = context + [4, 5, 6, 7, 8]
    lookup.refine(None, [9, 9, 5, 4, 9, 9])
    lookup.accept([9, 9, 5, 4, 9, 9, 5, 1])  # one of two kept -> kept + 1
    assert lookup.length == 2


def _repetitive_prompt(seed: int) -> list[int]:
    base = [(seed * 7 + i * 5) % 60 + 2 for i in range(6)]
    return base + base[:4] + base


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("with_heads", [False, True])
def test_lookup_drafts_are_lossless(tiny_models, dtype, seed, with_heads):
    model = tiny_models(seed, dtype)
    prompt, max_new = _repetitive_prompt(seed), 40
    want = reference_greedy(model, prompt, max_new)
    target = TargetModel(model)
    drafter = HeadsDrafter(random_heads(model, 3, seed), model.get_output_embeddings()) if with_heads else NoDrafter()
    refiner = ContextLookup(ArgmaxRefiner() if with_heads else None, min_ngram=1)
    got = generate(target, drafter, refiner, prompt, DecodeConfig(max_new_tokens=max_new))
    assert got.ids == want
    assert target.calls == got.steps + 1
    assert max(s.drafted for s in got.stats) > 0  # the lookup found something to verify


def test_lookup_accepts_repeated_text(tiny_models):
    """Greedy text of a tiny random model loops; the lookup must turn the loop into long blocks."""
    accepted = 0
    for seed in range(5):
        model = tiny_models(seed)
        prompt = _repetitive_prompt(seed)
        got = generate(TargetModel(model), NoDrafter(), ContextLookup(min_ngram=1), prompt,
                       DecodeConfig(max_new_tokens=60))
        assert got.ids == reference_greedy(model, prompt, 60)
        accepted += sum(s.accepted for s in got.stats)
    assert accepted > 20


def test_draft_vocab_restricts_drafts_and_survives_saving(tiny_models, tmp_path):
    model = tiny_models(1, torch.float32)
    heads = random_heads(model, 3, seed=1).float()
    vocab = torch.tensor([5, 9, 2, 33, 40, 41, 63, 17])
    heads.set_draft_vocab(vocab)
    loaded = load_heads(heads.save(tmp_path / "h"), dtype=torch.float32)
    assert loaded.config.draft_vocab_size == 8 and torch.equal(loaded.draft_vocab, vocab)
    drafter = HeadsDrafter(loaded, model.get_output_embeddings(), topk=3)
    lattice = drafter.propose(torch.randn(1, model.config.hidden_size), [1, 2])
    assert set(lattice.tokens.flatten().tolist()) <= set(vocab.tolist())
    prompt = _repetitive_prompt(1)
    got = generate(TargetModel(model), drafter, ArgmaxRefiner(), prompt, DecodeConfig(max_new_tokens=30))
    assert got.ids == reference_greedy(model, prompt, 30)


def test_cost_curve_is_measured_once_and_never_decreases(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(sizing, "BUSY_SPREAD", float("inf"))  # tiny forwards are noisy: cache whatever was measured
    target = TargetModel(tiny_models(0, torch.float32))
    key = {"model": "tiny", "threads": 1}
    curve = cached_cost_curve(target, key, tmp_path)
    assert list(curve.seconds) == sorted(curve.seconds) and curve.tokens[0] == 1
    (saved,) = tmp_path.glob("cost-curve-*.json")
    assert cached_cost_curve(target, key, tmp_path) == curve  # read back, not re-measured
    saved.write_text("{broken")
    assert isinstance(cached_cost_curve(target, key, tmp_path), CostCurve)  # a corrupt file is re-measured
    assert target.cache_length == 0


def test_a_busy_curve_is_not_cached_and_calibrate_measures_again(tiny_models, tmp_path, monkeypatch):
    target, key = TargetModel(tiny_models(0, torch.float32)), {"model": "tiny", "threads": 1}
    monkeypatch.setattr(sizing, "BUSY_SPREAD", -1.0)  # every measurement looks busy
    assert isinstance(cached_cost_curve(target, key, tmp_path), CostCurve) and not list(tmp_path.glob("*.json"))
    monkeypatch.setattr(sizing, "BUSY_SPREAD", float("inf"))
    first = cached_cost_curve(target, key, tmp_path)
    measured = []
    monkeypatch.setattr(sizing, "measure_cost_curve", lambda t, progress=False: measured.append(1) or first)
    assert cached_cost_curve(target, key, tmp_path) == first and not measured  # cached
    cached_cost_curve(target, key, tmp_path, remeasure=True)
    assert measured == [1]


@pytest.mark.parametrize("method", ["fast", "lookup", "bpd-ctx", "bpd-0gram-p4-fit-ctx"])
def test_default_method_matches_plain_decoding(method, tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKDRAFT_CACHE", str(tmp_path))
    dec = tiny_decoder(seed=2)
    prompt = _repetitive_prompt(2)
    want = dec.generate(ids=prompt, method="ar", max_new_tokens=30)
    got = dec.generate(ids=prompt, method=method, max_new_tokens=30)
    assert got.ids == want.ids
    assert got.steps <= want.steps


@pytest.mark.parametrize("seed", range(3))
def test_neural_rescoring_is_lossless_and_keeps_its_cache_in_step(tiny_models, seed):
    import warnings

    from blockdraft.refine.neural import NeuralRefiner, Rescorer
    from blockdraft.testing import tiny_llama

    model = tiny_models(seed)
    rescorer = Rescorer(tiny_llama(seed + 10, torch.float32), {"default": 1.0})
    refiner = NeuralRefiner(rescorer, alpha=2.0)
    prompt = _repetitive_prompt(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the cache goes by the keyword this transformers wants
        got = generate(TargetModel(model), HeadsDrafter(random_heads(model, 3, seed), model.get_output_embeddings(), topk=4),
                       refiner, prompt, DecodeConfig(max_new_tokens=25))
    assert got.ids == reference_greedy(model, prompt, 25)
    assert rescorer.ids == (prompt + got.ids)[: len(rescorer.ids)] and rescorer.cache.get_seq_length() == len(rescorer.ids)
