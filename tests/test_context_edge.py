"""Losslessness at the context limit: no method commits a token past the model's context.

Prompts end 1..60 tokens before a shrunk context; every drafter (plain and chained
heads, none) and refiner (argmax, p-best 0-gram and n-gram, neural, lookup, sized, context
drafts), chains and trees, must return exactly `ar`'s ids and fill the context, no more.
Scripted right drafts cover every gap in the quick suite; the methods cover a spread of gaps
there (the last steps before the limit are where they can go wrong) and every gap under `slow`.
"""
import json
import random
from pathlib import Path

import pytest
import torch

from blockdraft.api import Decoder
from blockdraft.drafting import NoDrafter
from blockdraft.engine import DecodeConfig, generate
from blockdraft.models import LoadedModel
from blockdraft.refine.base import ArgmaxRefiner
from blockdraft.refine.ngram import train_ngram
from blockdraft.target import TargetModel
from blockdraft.testing import (FixedDepthDrafter, ScriptedRefiner, random_heads,
                                reference_greedy, tiny_llama, tiny_tokenizer)

LIMIT = 96  # the shrunk context
GAPS = range(1, 61)  # prompts end this many tokens before it


def _prompt(gap: int, seed: int = 0) -> list[int]:
    """A prompt ending `gap` tokens before the limit; a repeated piece gives the lookup drafts to verify."""
    rng = random.Random(gap * 31 + seed)
    piece = [rng.randrange(2, 64) for _ in range(9)]
    ids = [rng.randrange(2, 64) for _ in range(LIMIT)]
    ids[-20:-11] = piece
    ids[-9:] = piece
    return ids[gap:]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(3, torch.float64, max_positions=LIMIT)


@pytest.fixture(scope="module")
def greedy(model):
    """`ar`'s answer of every prompt (plain decoding through the engine, up to the limit)."""
    target = TargetModel(model)
    return {gap: _decode(target, NoDrafter(), ArgmaxRefiner(), _prompt(gap)).ids for gap in GAPS}


@pytest.mark.parametrize("gap", [1, 2, 7, 60])
def test_ar_is_the_reference_greedy_decode(model, greedy, gap):
    assert greedy[gap] == reference_greedy(model, _prompt(gap), gap)


def _decode(target, drafter, refiner, prompt):
    result = generate(target, drafter, refiner, prompt, DecodeConfig(max_new_tokens=1000))
    assert target.cache_length == len(prompt) + result.new_tokens - 1
    return result


SCRIPTED = [(depth, wrong_at, True) for depth in (1, 4, 9) for wrong_at in ([None], [2, None], [None, 1, 0], [3, 1])]
SCRIPTED += [(4, [None], False), (9, [2, None], False)]  # transformers' own forward: chain and tree


@pytest.mark.parametrize(("depth", "wrong_at", "fast_path"), SCRIPTED,
                         ids=[f"k{d}-{'tree' if len(w) > 1 else 'chain'}{w}-{'fast' if f else 'hf'}" for d, w, f in SCRIPTED])
def test_scripted_drafts_stop_at_the_context(model, greedy, fast_path, wrong_at, depth):
    """Right drafts up to the limit: the tree must leave the last position for the target's own token."""
    target = TargetModel(model, fast_path=fast_path)
    for gap in GAPS:
        prompt = _prompt(gap)
        refiner = ScriptedRefiner(len(prompt), greedy[gap], depth, 64, wrong_at)
        got = _decode(target, FixedDepthDrafter(depth), refiner, prompt)
        assert got.ids == greedy[gap], gap
        assert got.stop_reason == "context" and len(prompt) + got.new_tokens == LIMIT


@pytest.fixture(scope="module")
def decoders(model, tmp_path_factory):
    """Decoders over the shrunk model with plain and chained heads, an n-gram LM and a rescorer."""
    folder = tmp_path_factory.mktemp("edge")
    rng = random.Random(0)
    ngram = folder / "ngram.npz"
    train_ngram([[rng.randrange(64) for _ in range(40)] for _ in range(50)], 3, vocab_size=64).save(ngram)
    rescorer = folder / "rescorer"
    tiny_llama(13, torch.float32, max_positions=LIMIT).save_pretrained(rescorer)
    (rescorer / "rescorer.json").write_text(json.dumps({"alpha": {"default": 1.0}}))
    loaded = LoadedModel(model, tiny_tokenizer(64), "tiny-edge")
    out = {}
    for name, heads in [("heads", random_heads(model, 4, 1)), ("chained", random_heads(model, 5, 2, chain=True))]:
        dec = Decoder(loaded, heads, None)
        dec.use_refiner_files(ngram=ngram, rescorer=rescorer)
        out[name] = dec
    return out


METHODS = ["ar", "bpd", "bpd-full", "lookup", "bpd-0gram-p4", "bpd-ngram-p4", "bpd-neural", "bpd-0gram-p4-fit",
           "bpd-ctx", "bpd-ngram-p4-ctx", "fast"]


CASES = [(m, h) for m in METHODS for h in (["heads", "chained"] if m not in ("ar", "lookup") else ["heads"])]


def _check_methods(decoders, greedy, method, heads, gaps):
    dec = decoders[heads]
    for gap in gaps:
        prompt = _prompt(gap)
        drafter, refiner = dec.build(method)
        got = _decode(dec.target, drafter, refiner, prompt)
        assert got.ids == greedy[gap], gap
        assert got.stop_reason == "context" and len(prompt) + got.new_tokens == LIMIT


@pytest.mark.parametrize(("method", "heads"), CASES)
def test_every_method_equals_ar_up_to_the_context(decoders, greedy, method, heads, monkeypatch, tmp_path_factory):
    """Gaps 1-6 always, and a few more that differ from case to case (every gap in 7..60 is covered)."""
    monkeypatch.setenv("BLOCKDRAFT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))  # the cost curve
    index = CASES.index((method, heads))
    spread = [gap for gap in range(7, 61) if gap % len(CASES) in (index, (index * 7 + 3) % len(CASES))]
    _check_methods(decoders, greedy, method, heads, [*range(1, 7), *spread])


@pytest.mark.slow
@pytest.mark.parametrize(("method", "heads"), CASES)
def test_every_method_on_every_gap(decoders, greedy, method, heads, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("BLOCKDRAFT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    _check_methods(decoders, greedy, method, heads, GAPS)


def test_the_edge_is_reached_with_a_full_draft(model, greedy):
    """The cases above are not vacuous: fully right drafts reach the limit inside one step."""
    target = TargetModel(model)
    prompt = _prompt(6)  # a plain first step, then 5 positions left for an 8-token draft
    got = _decode(target, FixedDepthDrafter(8), ScriptedRefiner(len(prompt), greedy[6], 8, 64), prompt)
    assert [(s.drafted, s.committed) for s in got.stats] == [(0, 1), (4, 5)]
    plain = _decode(target, NoDrafter(), ArgmaxRefiner(), prompt)
    assert plain.ids == got.ids


@pytest.fixture(scope="module")
def real_decoder():
    """SmolLM2 with its context cut to 512 tokens."""
    import blockdraft

    try:
        dec = blockdraft.load()
    except blockdraft.BlockdraftError as exc:
        pytest.skip(str(exc))
    dec.target.max_positions = 512
    return dec


@pytest.mark.slow
@pytest.mark.parametrize("gap", [2, 9, 33, 60])
def test_real_model_at_a_shrunk_context(real_decoder, gap):
    """The drafting methods stop where `ar` stops, with the same ids."""
    dec = real_decoder
    text = (Path(__file__).parents[1] / "README.md").read_text()
    prompt = dec.tokenizer(text)["input_ids"][: 512 - gap]
    want = dec.generate(ids=prompt, method="ar", max_new_tokens=100)
    assert want.stop_reason == "context" and len(prompt) + want.new_tokens == 512
    for method in ("fast", "bpd", "lookup", "bpd-ngram-p4"):
        got = dec.generate(ids=prompt, method=method, max_new_tokens=100)
        assert got.ids == want.ids, method
