"""Training-prompt mix: tiny fake corpora in the real layouts, plus one check of the real mix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from blockdraft.data.train_prompts import (DOMAINS, SOURCES, build_training_prompts, default_mix, long_first,
                                           source_summary, write_jsonl)
from blockdraft.errors import BlockdraftError

REAL_ROOT = Path("/work/shared/data/train_prompts")
REAL_BENCH = Path("/work/shared/data/spec_bench")
LONG = "word " * 1300  # > 6000 characters

BENCH_QUESTION = ("Draft a professional email seeking your supervisor's feedback on the quarterly "
                  "financial report you prepared for the board meeting next week.")


def _jsonl(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _dump(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture
def corpora(tmp_path: Path) -> Path:
    """Mimics shared/data/train_prompts for six sources, with a Spec-Bench folder beside it."""
    root = tmp_path / "train_prompts"
    _jsonl(root / "gsm8k" / "train.jsonl", [json.dumps({"question": q, "answer": "#### 1"}) for q in (
        "Tom has 3 apples and buys 2 more. How many apples does he have?",
        "A train travels 270 miles in 3 hours. How many miles per hour?",  # excluded by index
        "Sara reads 5 pages a day. How many pages does she read in a week?",
        "Ann has 4 cats. How many cat ears are there?",  # duplicate of instructionwild below
    )])
    _jsonl(root / "instructionwild" / "user_1.jsonl", [
        json.dumps({"instruction": "Write a haiku about autumn.", "instruction_type": "Generation"}),
        r'{"instruction": "What does this regex do? /\b\d+\b/"}',  # invalid \escape, as upstream
        json.dumps({"instruction": "  ann has 4 CATS.  How many cat ears are there? "}),
        json.dumps({"instruction": "   "}),  # empty prompt
        json.dumps({"instruction": LONG}),  # too long
        json.dumps({"instruction": BENCH_QUESTION}),  # equals a Spec-Bench turn
        json.dumps({"instruction": "Please draft a professional email seeking your supervisor's "
                                   "feedback on the quarterly financial report you prepared today."}),
    ])
    _jsonl(root / "sharegpt" / "sharegpt_v3_en_human_turns.jsonl", [json.dumps(r) for r in (
        {"id": "aaa_0", "turns": ["Hi, can you help me plan a trip?", "Make it three days.", LONG,
                                  "ignored after the long turn"], "n_gpt_turns": 4},
        {"id": "aaa_1", "turns": ["continue from where you stopped"], "n_gpt_turns": 1},  # mid-chat
        {"id": "bbb_0", "turns": ["Act as a teacher and explain fractions."], "n_gpt_turns": 1},
    )])
    _dump(root / "gpteacher" / "codegen-instruct.json", [
        {"instruction": "Write a Python function that reverses a string.", "input": "", "response": ""},
        {"instruction": "Fix this code.", "input": "print 'hi'", "response": ""},
    ])
    _dump(root / "gpteacher" / "roleplay-simple-deduped-roleplay-instruct.json", [
        {"instruction": "You are a pirate captain. Describe your ship.", "input": "", "response": ""},
    ])
    (root / "tatoeba").mkdir()
    (root / "tatoeba" / "tatoeba.deu-eng.deu").write_text("Ich bin müde.\nDas ist gut.\n", "utf-8")
    (root / "tatoeba" / "tatoeba.deu-eng.eng").write_text("I am tired.\nThat is good.\n", "utf-8")
    _jsonl(root / "llm_foundry_eval" / "arc_easy.jsonl", [json.dumps(
        {"query": "Question: Which gas do plants absorb?", "choices": ["oxygen", "carbon dioxide"],
         "gold": 1})])
    _jsonl(root / "llm_foundry_eval" / "commonsense_qa.jsonl", [json.dumps(
        {"query": "Question: Where do you keep milk?\nChoices:\nA. fridge\nB. oven\nAnswer:",
         "choices": ["A", "B"], "gold": 0})])
    _dump(root / "overlap_exclusions.json", {
        "_about": "indices are 0-based",
        "gsm8k/train.jsonl": {"indices": [1], "why": "near-duplicate of a test question"},
        "sharegpt/sharegpt_v3_en_human_turns.jsonl": {"indices": [], "ids": ["bbb_0"], "why": "mt"},
        "llm_foundry_eval (not copied)": "boolq.jsonl was left out",
    })
    _jsonl(tmp_path / "spec_bench" / "question_dev.jsonl",
           [json.dumps({"question_id": 82, "category": "writing", "turns": [BENCH_QUESTION]})])
    return root


MIX = {"gsm8k": 10, "instructionwild": 10, "sharegpt": 10, "gpteacher": 10, "tatoeba": 10,
       "llm_foundry_eval": 10}


def _by_id(rows: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in rows}


def test_rows_follow_the_schema(corpora: Path) -> None:
    rows = build_training_prompts(corpora, MIX)
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert set(row) == {"id", "source", "domain", "license", "turns"}
        assert row["id"].startswith(row["source"] + "/") and row["domain"] in DOMAINS
        assert row["license"] == SOURCES[row["source"]].license
        assert row["turns"] and all(t.strip() and len(t) <= 6000 for t in row["turns"])
    by_id = _by_id(rows)
    assert by_id["gpteacher/codegen-instruct.json:1"]["turns"] == ["Fix this code.\n\nprint 'hi'"]
    assert by_id["gpteacher/roleplay-simple-deduped-roleplay-instruct.json:0"]["domain"] == "roleplay"
    assert by_id["gsm8k/train.jsonl:0"]["domain"] == "math"


def test_exclusions_broken_lines_duplicates_and_benchmark_are_dropped(corpora: Path, capsys) -> None:
    ids = set(_by_id(build_training_prompts(corpora, MIX)))
    assert "gsm8k/train.jsonl:1" not in ids  # excluded by index
    assert not any(i.startswith("sharegpt/sharegpt_v3_en_human_turns.jsonl:2") for i in ids)  # by id
    assert "instructionwild/user_1.jsonl:1" not in ids  # unparsable
    assert "instructionwild/user_1.jsonl:3" not in ids and "instructionwild/user_1.jsonl:4" not in ids
    assert "instructionwild/user_1.jsonl:5" not in ids  # equal to a Spec-Bench turn
    assert "instructionwild/user_1.jsonl:6" not in ids  # shares a 13-gram with it
    # "Ann has 4 cats" appears twice (case and spacing differ): exactly one survives
    assert ("gsm8k/train.jsonl:3" in ids) != ("instructionwild/user_1.jsonl:2" in ids)
    err = capsys.readouterr().err
    assert "user_1.jsonl:2" in err  # file and 1-based line number of the broken line


def test_sharegpt_keeps_turns_until_a_long_one_and_skips_later_parts(corpora: Path) -> None:
    rows = [r for r in build_training_prompts(corpora, {"sharegpt": 5}) if r["source"] == "sharegpt"]
    assert [r["turns"] for r in rows] == [["Hi, can you help me plan a trip?", "Make it three days."]]


def test_translation_and_multiple_choice_phrasing(corpora: Path) -> None:
    by_id = _by_id(build_training_prompts(corpora, MIX))
    assert by_id["tatoeba/tatoeba.deu-eng.eng:0"]["turns"] == ["Translate English to German: I am tired."]
    assert by_id["tatoeba/tatoeba.deu-eng.deu:1"]["turns"] == ["Translate German to English: Das ist gut."]
    assert by_id["llm_foundry_eval/arc_easy.jsonl:0"]["turns"] == [
        "Which gas do plants absorb?\nA. oxygen\nB. carbon dioxide"]
    assert by_id["llm_foundry_eval/commonsense_qa.jsonl:0"]["turns"] == [
        "Where do you keep milk?\nChoices:\nA. fridge\nB. oven"]


def test_counts_seed_and_determinism(corpora: Path) -> None:
    rows = build_training_prompts(corpora, {"gsm8k": 2, "tatoeba": 1}, seed=3)
    assert source_summary(rows)["sources"] == {"gsm8k": 2, "tatoeba": 1}
    assert rows == build_training_prompts(corpora, {"gsm8k": 2, "tatoeba": 1}, seed=3)
    orders = {tuple(r["id"] for r in build_training_prompts(corpora, MIX, seed=s)) for s in range(5)}
    assert len(orders) > 1


def test_noncommercial_sources_can_be_left_out(corpora: Path) -> None:
    sources = {r["source"] for r in build_training_prompts(corpora, MIX, include_noncommercial=False)}
    assert sources == {"gsm8k", "gpteacher", "tatoeba", "llm_foundry_eval"}


def test_missing_source_warns_and_unknown_source_fails(corpora: Path, capsys) -> None:
    rows = build_training_prompts(corpora, {"gsm8k": 1, "wmt22": 5})
    assert [r["source"] for r in rows] == ["gsm8k"]
    assert "wmt22" in capsys.readouterr().err
    with pytest.raises(BlockdraftError):
        build_training_prompts(corpora, {"no_such_source": 1})


def test_write_jsonl_and_summary(corpora: Path, tmp_path: Path) -> None:
    rows = build_training_prompts(corpora, MIX)
    out = tmp_path / "out" / "prompts.jsonl"
    write_jsonl(rows, out)
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == rows
    summary = source_summary(rows)
    assert summary["total"] == len(rows) == sum(summary["sources"].values())
    assert sum(summary["domains"].values()) == len(rows)
    assert summary["licenses"]["MIT"] == summary["sources"]["gsm8k"] + summary["sources"]["gpteacher"]


def test_default_mix_names_known_sources() -> None:
    mix = default_mix()
    assert set(mix) <= set(SOURCES) and 38_000 <= sum(mix.values()) <= 42_000


@pytest.mark.skipif(not REAL_ROOT.is_dir(), reason="shared training corpora not present")
def test_real_default_mix() -> None:
    rows = build_training_prompts(REAL_ROOT)
    target = sum(default_mix().values())
    assert abs(len(rows) - target) <= 0.1 * target
    assert {r["domain"] for r in rows} == set(DOMAINS)
    exclusions = json.loads((REAL_ROOT / "overlap_exclusions.json").read_text(encoding="utf-8"))
    excluded = set()
    for key, entry in exclusions.items():
        if isinstance(entry, dict):
            excluded |= {f"{key}:{i}" for i in entry.get("indices", [])}
            upstream = set(entry.get("ids", []))
            if upstream:  # listed by the file's own id: find their lines
                with (REAL_ROOT / key).open(encoding="utf-8") as handle:
                    excluded |= {f"{key}:{n}" for n, line in enumerate(handle)
                                 if json.loads(line).get("id") in upstream}
    assert excluded and not excluded & {r["id"] for r in rows}
    bench = {" ".join(t.lower().split()) for f in REAL_BENCH.glob("question*.jsonl")
             for line in f.read_text(encoding="utf-8").splitlines() for t in json.loads(line)["turns"]}
    assert not bench & {" ".join(t.lower().split()) for r in rows for t in r["turns"]}


def test_long_first_moves_long_prompts_ahead_keeping_each_part_in_order() -> None:
    rows = [{"id": str(i), "turns": [text]} for i, text in enumerate(["ab", "x" * 9, "abc", "y" * 12, "z"])]
    assert [r["id"] for r in long_first(rows, 9)] == ["1", "3", "0", "2", "4"]
    assert long_first(rows, 100) == rows and long_first(rows, 0) == rows
