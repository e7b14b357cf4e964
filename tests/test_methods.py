"""Methods as data: one spelling per method, one-line refusals before any model loads, builders
that change nothing, and every preset and family member exactly greedy on a tiny model."""
import dataclasses
import random

import pytest
import torch

from blockdraft.drafting import HeadsDrafter, NoDrafter
from blockdraft.eagle.model import random_eagle, save_eagle
from blockdraft.engine import DecodeConfig, generate
from blockdraft.errors import BlockdraftError
from blockdraft.lookup import ContextLookup
from blockdraft.methods import (BASES, P_MAX, PRESETS, TOPK_MAX, MethodSpec, Parts, build, parse, pick_alpha,
                                settle)
from blockdraft.refine.base import ArgmaxRefiner
from blockdraft.refine.lattice import PBestRefiner
from blockdraft.refine.neural import NeuralRefiner, Rescorer
from blockdraft.refine.ngram import train_ngram
from blockdraft.sizing import CostCurve, FittedRefiner
from blockdraft.target import TargetModel
from blockdraft.testing import random_heads, reference_greedy, tiny_decoder, tiny_llama

BASE_NAMES = [*(b for b in BASES if b != "eagle"), "bpd-ngram", "bpd-ngram-p4", "bpd-0gram-p1", "bpd-0gram-p4"]
FAMILY = [base + suffix for base in BASE_NAMES for suffix in ("", "-fit", "-ctx", "-fit-ctx")]
EVERY = list(dict.fromkeys([*PRESETS, *FAMILY, "eagle-ctx"]))
# A cost curve under which several draft nodes pay, so sized drafts are not always empty.
CHEAP = CostCurve((1, 2, 4, 8, 16, 32), (1.0, 1.02, 1.05, 1.1, 1.3, 1.8))


def _prompt(seed: int) -> list[int]:
    base = [(seed * 7 + i * 5) % 60 + 2 for i in range(6)]
    return base + base[:4] + base  # repeats: the context lookup finds drafts


def _parts(model, seed: int, chain: bool = False) -> Parts:
    rng = random.Random(seed)
    lm = train_ngram([[rng.randrange(64) for _ in range(20)] for _ in range(200)], 3, vocab_size=64)
    lm.meta["alpha"] = {"default": 0.7, "writing": 0.3}
    rescorer = Rescorer(tiny_llama(seed + 10, torch.float32), {"default": 1.0})
    return Parts(model.get_output_embeddings(), heads=random_heads(model, 4, seed, chain=chain), ngram=lm,
                 rescorer=rescorer, cost=CHEAP, eagle=random_eagle(model, seed),
                 embed=model.get_input_embeddings().weight)


def test_presets_and_families_parse_to_their_canonical_names():
    assert set(PRESETS) == {"ar", "bpd", "bpd-full", "lookup", "fast", "eagle"}
    for name in EVERY:
        spec = parse(name)
        assert isinstance(spec, MethodSpec)
        assert spec.name == name or (name == "bpd-0gram-p1" and spec.name == name), name
    assert parse("bpd-ngram-p1") == parse("bpd-ngram")  # p1 is the default p
    assert parse("bpd-ngram-p4-fit-ctx") == MethodSpec(drafter="heads", topk=16, stop=0.02, refiner="pbest", p=4,
                                                       alpha=None, fit=True, context=True)
    assert parse("bpd-0gram-p4").alpha == 0.0 and parse("bpd-0gram-p4").needs == {"heads"}
    assert parse("bpd-neural-fit").needs == {"heads", "rescorer", "cost"}
    assert parse("lookup").needs == frozenset() and parse("lookup").context
    assert parse("bpd-fit").topk == 4 and parse("bpd-fit").stop == 0.05  # -fit: a wider lattice, the larger bar
    assert parse(f"bpd-ngram-p{P_MAX}").p == P_MAX
    assert MethodSpec(drafter="heads", topk=3).name.startswith("MethodSpec(")  # no name spells it


@pytest.mark.parametrize("name,says", [
    ("bpd-ctx-fit", "then at most one -ctx"),
    ("bpd-ngram-p4-ctx-fit", "then at most one -ctx"),
    ("bpd-fit-fit", "at most one -fit"),
    ("bpd-ctx-ctx", "at most one -ctx"),
    ("bpd" + "-ctx" * 1500, "at most 120 characters"),
    ("bpd" + "-fit-ctx" * 10, "at most one -fit"),
    ("ar-fit", "ar has no drafts"),
    ("ar-ctx", "use lookup"),
    ("lookup-fit", "lookup takes no suffix"),
    ("lookup-ctx", "lookup takes no suffix"),
    ("fast-ctx", "fast already"),
    ("eagle-fit", "sizes its own tree"),
    ("eagle-fit-ctx", "sizes its own tree"),
    ("bpd-ngram-p0", f"from 1 to {P_MAX}"),
    (f"bpd-ngram-p{P_MAX + 1}", f"from 1 to {P_MAX}"),
    ("bpd-0gram-p007", f"from 1 to {P_MAX}"),
    ("bpd-ngram-p99999999999999999999", f"from 1 to {P_MAX}"),
    ("bpd-0gram", "bpd-0gram-p4"),
    ("nope", "choose one of"),
    ("", "choose one of"),
    ("BPD", "choose one of"),
    ("bpd-ngram-p4-", "choose one of"),
])
def test_bad_names_are_refused_in_one_line(name, says):
    with pytest.raises(BlockdraftError, match="unknown method") as info:
        parse(name)
    message = str(info.value)
    assert says in message and "\n" not in message and len(message) < 300


@pytest.mark.parametrize("fields,says", [
    ({"drafter": "medusa"}, "unknown drafter"),
    ({"drafter": "eagle"}, "takes the tree refiner"),
    ({"drafter": "heads", "refiner": "tree"}, "takes the tree refiner"),
    ({"refiner": "beam"}, "unknown refiner"),
    ({"drafter": "heads", "topk": 0}, f"between 1 and {TOPK_MAX}"),
    ({"drafter": "heads", "topk": TOPK_MAX + 1}, f"between 1 and {TOPK_MAX}"),
    ({"drafter": "heads", "refiner": "pbest", "p": P_MAX + 1}, f"between 1 and {P_MAX}"),
    ({"drafter": "heads", "p": 4}, "needs the pbest refiner"),
    ({"drafter": "heads", "stop": 1.5}, "stop threshold"),
    ({"drafter": "heads", "refiner": "pbest", "alpha": -1.0}, "alpha"),
    ({"refiner": "pbest"}, "needs a drafter"),
    ({"fit": True}, "needs a drafter"),
])
def test_invalid_specs_are_refused_in_one_line(fields, says):
    with pytest.raises(BlockdraftError, match="invalid method") as info:
        MethodSpec(**fields)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_specs_are_frozen_and_builders_change_nothing(tiny_models):
    model = tiny_models(0, torch.float32)
    parts = _parts(model, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        parse("bpd").topk = 4
    state = {k: v.clone() for k, v in parts.heads.state_dict().items()}
    before = dict(vars(parts.heads))
    sized, _ = build(parse("bpd-fit"), parts)
    plain, refiner = build(parse("bpd"), parts)
    assert (sized.topk, sized.stop_below) == (4, 0.05) and (plain.topk, plain.stop_below) == (1, 0.05)
    assert isinstance(refiner, ArgmaxRefiner)
    assert all(torch.equal(v, parts.heads.state_dict()[k]) for k, v in state.items())
    assert vars(parts.heads).keys() == before.keys()
    assert build(parse("bpd"), parts)[0] is not plain  # a fresh pair per generation


def test_builders_assemble_what_the_spec_says(tiny_models):
    model = tiny_models(0, torch.float32)
    parts = _parts(model, 0)
    drafter, refiner = build(parse("ar"), parts)
    assert isinstance(drafter, NoDrafter) and isinstance(refiner, ArgmaxRefiner)
    drafter, refiner = build(parse("bpd-ngram-p4-fit-ctx"), parts, domain="writing")
    assert isinstance(drafter, HeadsDrafter) and (drafter.topk, drafter.stop_below) == (16, 0.02)
    assert isinstance(refiner, ContextLookup) and isinstance(refiner.inner, FittedRefiner)
    pbest = refiner.inner.inner
    assert isinstance(pbest, PBestRefiner) and pbest.p == 4 and pbest.lm is parts.ngram and pbest.alpha == 0.3
    assert build(parse("bpd-ngram"), parts)[1].alpha == 0.7  # no domain: the table's default
    assert build(parse("bpd-0gram-p2"), parts)[1].lm is None
    assert isinstance(build(parse("bpd-neural"), parts)[1], NeuralRefiner)
    assert build(parse("bpd-full"), parts, record=True)[0].with_entropy
    assert pick_alpha({}, "writing") == 1.0 and pick_alpha({"default": 2.0}, None) == 2.0


def test_fast_uses_what_is_loaded():
    fast = PRESETS["fast"]
    assert settle(fast, heads=False, ngram=True) == PRESETS["lookup"]
    assert settle(fast, heads=True, ngram=False) == parse("bpd-0gram-p4-fit-ctx")
    assert settle(fast, heads=True, ngram=True) == parse("bpd-ngram-p4-fit-ctx")
    assert settle(parse("bpd"), heads=False, ngram=False) == parse("bpd")


def test_a_missing_part_is_one_line(tiny_models):
    model = tiny_models(0, torch.float32)
    with pytest.raises(BlockdraftError, match="needs ngram"):
        build(parse("bpd-ngram"), Parts(model.get_output_embeddings(), heads=random_heads(model, 2)))
    dec = tiny_decoder()
    with pytest.raises(BlockdraftError, match="no n-gram LM"):
        dec.generate(ids=[1, 2], method="bpd-ngram")
    dec.heads = None
    with pytest.raises(BlockdraftError, match="no draft heads"):
        dec.generate(ids=[1, 2], method="bpd-0gram-p4-fit")
    assert dec.generate(ids=[1, 2, 1, 2], method="fast", max_new_tokens=4).new_tokens == 4  # fast: lookup alone


@pytest.mark.parametrize("name", EVERY)
@pytest.mark.parametrize("seed,chain", [(0, False), (1, True)])
def test_every_method_is_exactly_greedy(tiny_models, name, seed, chain):
    model = tiny_models(seed, torch.float32)
    prompt, max_new = _prompt(seed), 24
    drafter, refiner = build(parse(name), _parts(model, seed, chain), domain="writing")
    target = TargetModel(model)
    got = generate(target, drafter, refiner, prompt, DecodeConfig(max_new_tokens=max_new))
    assert got.ids == reference_greedy(model, prompt, max_new), name
    assert target.calls == got.steps + 1


@pytest.mark.parametrize("name", ["bpd-0gram-p4-fit", "bpd-ngram-p4-fit", "bpd-neural-fit", "bpd-fit",
                                  "bpd-ngram-p4", "bpd-neural"])
def test_a_draft_stopped_before_its_first_head_is_a_plain_step(tiny_models, name):
    """Heads that are never confident enough return no lattice; every refiner then drafts nothing."""
    model = tiny_models(2, torch.float32)
    spec = dataclasses.replace(parse(name), stop=1.0)  # no head's chance reaches 1.0
    drafter, refiner = build(spec, _parts(model, 2))
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    got = generate(TargetModel(model), drafter, refiner, prompt, DecodeConfig(max_new_tokens=12))
    assert got.ids == reference_greedy(model, prompt, 12)
    assert got.steps == 12 and all(s.drafted == 0 for s in got.stats)


@pytest.mark.parametrize("name", [*PRESETS, "bpd-ngram-p4-fit", "bpd-0gram-p4-fit", "bpd-neural-fit-ctx"])
def test_decoder_runs_every_preset(name, tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKDRAFT_CACHE", str(tmp_path))
    dec = tiny_decoder(seed=2)
    rng = random.Random(0)
    lm = train_ngram([[rng.randrange(64) for _ in range(20)] for _ in range(100)], 3, vocab_size=64)
    lm.save(tmp_path / "lm.npz")
    dec.use_refiner_files(ngram=tmp_path / "lm.npz")
    model = tiny_llama(12, torch.float32)
    model.save_pretrained(tmp_path / "rescorer")
    (tmp_path / "rescorer" / "rescorer.json").write_text('{"alpha": {"default": 1.0}}')
    dec.use_refiner_files(rescorer=tmp_path / "rescorer")
    save_eagle(random_eagle(dec.loaded.model, 2), tmp_path / "eagle")
    dec.use_eagle(tmp_path / "eagle")
    prompt = _prompt(2)
    want = dec.generate(ids=prompt, method="ar", max_new_tokens=20)
    got = dec.generate(ids=prompt, method=name, max_new_tokens=20)
    assert got.ids == want.ids and got.steps <= want.steps


@pytest.mark.parametrize("argv", [
    ["generate", "--prompt", "hi", "--method", "bpd-ctx-fit"],
    ["generate", "--prompt", "hi", "--method", "bpd-ngram-p65"],
    ["analyze", "--out", "x", "--method", "ar-fit"],
    ["bench", "--out", "x", "--methods", "ar,lookup-fit"],
])
def test_cli_refuses_bad_methods_before_loading(argv, monkeypatch, capsys):
    import blockdraft
    from blockdraft.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(blockdraft, "load", no_load)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown method" in err
