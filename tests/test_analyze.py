"""End to end draft analysis on a tiny random model: files, schema, and the exactness of the oracle."""
import json

import pytest
import torch

import blockdraft
from blockdraft.analysis.metrics import repetition_of_drafts
from blockdraft.analysis.runner import FIELDS, analyze
from blockdraft.api import Decoder
from blockdraft.cli import main
from blockdraft.errors import BlockdraftError
from blockdraft.heads import DraftHeads, HeadsConfig
from blockdraft.testing import tiny_decoder

QUESTIONS = [{"question_id": i, "category": c, "turns": [t, "and then ?"]} for i, (c, t) in enumerate([
    ("writing", "write a short poem about the sky"), ("math", "what is two and three"),
    ("qa", "name three rivers"), ("qa", "why is the sky blue"), ("coding", "write code to list text")])]
TOPKS = (2, 4, 8, 16)
SUMMARY_KEYS = {"questions", "new_tokens", "steps", "block_efficiency", "repetition", "entropy", "h_max", "accuracy",
                "oracle_be", "oracle_headroom", "oracle_bound_be", "teacher_forced_agreement"}


@pytest.fixture(scope="module")
def decoder():
    return tiny_decoder(seed=0, num_heads=3)


@pytest.fixture(scope="module")
def report(decoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    result = analyze(decoder, QUESTIONS, topks=TOPKS, max_new_tokens=24, out_dir=out, progress=False)
    return result, out


def _summaries(result: dict) -> dict:
    return {**result["categories"], **result["groups"], "overall": result["overall"]}


def test_files_and_schema(report):
    result, out = report
    on_disk = json.loads((out / "analysis.json").read_text())
    assert on_disk == result
    assert set(result) == {"fields", "config", "categories", "groups", "overall", "correlation", "questions", "figures"}
    assert result["fields"] == FIELDS
    assert set(result["categories"]) == {"writing", "math", "qa", "coding"} and set(result["groups"]) == {"mt_bench"}
    assert result["groups"]["mt_bench"]["questions"] == 3 and result["overall"]["questions"] == 5
    for name, s in _summaries(result).items():
        assert SUMMARY_KEYS <= set(s), name
        assert len(s["entropy"]["mean"]) == 3 and set(s["accuracy"]) == {"top1", "top2", "top4", "top8", "top16"}
        assert s["teacher_forced_agreement"] == 1.0
    assert all(len(s["examples"]) == 3 for s in result["categories"].values())
    assert set(result["correlation"]["h_max_vs_block_efficiency"]) == {"r", "categories", "h_max", "block_efficiency"}
    for png in result["figures"].values():
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    md = (out / "analysis.md").read_text()
    assert "| overall | 5 |" in md and "oracle k=16" in md and "~~" in md


def test_oracle_exact_and_above_actual(report):
    result, _ = report
    for q in result["questions"]:
        assert q["oracle_be"]["1"] == q["block_efficiency"]  # k = 1 walk == the run, step for step
    for name, s in _summaries(result).items():
        be, oracle, bound = s["block_efficiency"], s["oracle_be"], s["oracle_bound_be"]
        assert oracle["1"] == be and bound["1"] == be, name
        # on this fixed model the greedy walk never drops below the run (not a theorem: see oracle_bound_steps)
        assert all(oracle[str(k)] >= be for k in TOPKS), name
        values = [bound[str(k)] for k in (1, *TOPKS)]
        assert values == sorted(values) and all(bound[k] >= oracle[k] for k in oracle), name
        assert s["oracle_headroom"]["1"] == 0.0


def test_records_the_methods_own_drafts(decoder, report):
    result, _ = report
    run = decoder.generate(QUESTIONS[0]["turns"][0], method="bpd-full", record=True, max_new_tokens=24)
    assert result["categories"]["writing"]["repetition"] == repetition_of_drafts([s.draft for s in run.stats])


def test_repeating_heads_known_answer():
    """Zero-initialised heads all copy the base model's guess: every draft is one token K times."""
    dec = tiny_decoder(seed=1, num_heads=3)
    model = dec.loaded.model
    heads = DraftHeads(HeadsConfig(num_heads=3, hidden_size=model.config.hidden_size,
                                   vocab_size=model.config.vocab_size)).to(torch.float64)
    dec = Decoder(dec.loaded, heads, None)
    s = analyze(dec, QUESTIONS[:1], topks=(2,), max_new_tokens=12, progress=False)["overall"]
    assert s["repetition"]["consec_pct"] == 100.0 and s["repetition"]["max_run_mean"] == 3.0
    assert s["h_max"] == 1  # equal entropies: not rising
    assert s["entropy"]["mean"][0] == pytest.approx(s["entropy"]["mean"][2])


def test_plain_decoding_has_no_drafts(decoder):
    s = analyze(decoder, QUESTIONS[:1], topks=(2,), max_new_tokens=8, method="ar", progress=False)["overall"]
    assert s["block_efficiency"] == 1.0 and s["repetition"]["drafts"] == 0 and s["h_max"] is None
    assert s["oracle_be"]["2"] >= 1.0 and s["accuracy"]["top1"] == [None, None, None]


@pytest.mark.parametrize("bad, kwargs, message", [
    ([], {}, "no questions"),
    (QUESTIONS[:1], {"topks": (0,)}, "topks"),
    ([{"question_id": 1, "category": "qa"}], {}, "'turns'"),
    (QUESTIONS[:1], {"method": "nope"}, "unknown method"),
])
def test_bad_input_is_one_line(decoder, bad, kwargs, message):
    with pytest.raises(BlockdraftError, match=message) as err:
        analyze(decoder, bad, progress=False, **kwargs)
    assert "\n" not in str(err.value)


def test_cli(decoder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(blockdraft, "load", lambda *a, **k: decoder)
    prompts = tmp_path / "q.jsonl"
    prompts.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    rc = main(["analyze", "--prompts", str(prompts), "--categories", "mt_bench", "--per-category", "1",
               "--topk", "2,4", "--max-new-tokens", "6", "--out", str(tmp_path / "out")])
    assert rc == 0 and "block efficiency" in capsys.readouterr().err
    saved = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert saved["config"]["ks"] == [1, 2, 4] and set(saved["categories"]) == {"writing", "math", "coding"}
    assert main(["analyze", "--prompts", str(prompts), "--topk", "2,x", "--out", str(tmp_path / "o2")]) == 2
    assert "--topk" in capsys.readouterr().err
