"""Spec-Bench's metrics in results.json/md equal what its evaluation/speed.py computes from our
answer files (tiny random model; speed.py's formula restated below)."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from blockdraft.bench import run_bench
from blockdraft.bench.specbench import metrics
from blockdraft.testing import tiny_decoder

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a short poem about the sky.", "Now explain it."]},
    {"question_id": 2, "category": "roleplay", "turns": ["Name three rivers."]},
    {"question_id": 3, "category": "qa", "turns": ["What is one and two?"]},
    {"question_id": 4, "category": "qa", "turns": ["Write an email about the sky."]},
]
MT_BENCH = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]


def speed_py(answers: list[dict], baseline: list[dict], count_tokens, task: str):
    """Spec-Bench's evaluation/speed.py `speed()`, restated: per-answer rates averaged, steps pooled."""
    def keep(a):
        return task == "overall" or (a["category"] in MT_BENCH if task == "mt_bench" else a["category"] == task)

    speeds, accepted = [], []
    for a in filter(keep, answers):
        choice = a["choices"][0]
        speeds.append(sum(choice["new_tokens"]) / sum(choice["wall_time"]))
        accepted.extend(choice["accept_lengths"])
    base = []
    for a in filter(keep, baseline):
        choice = a["choices"][0]
        base.append(sum(count_tokens(t) - 1 for t in choice["turns"]) / sum(choice["wall_time"]))
    return np.mean(accepted) if accepted else None, np.mean(speeds) / np.mean(base)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    torch.set_num_threads(1)
    decoder = tiny_decoder(seed=1, num_heads=3)
    out = tmp_path_factory.mktemp("specbench")
    results = run_bench(decoder, QUESTIONS, ["ar", "bpd-full", "hf-greedy"], 10, out)
    return results, out, lambda text: len(decoder.tokenizer(text).input_ids)


def _answers(out, method):
    return [json.loads(line) for line in (out / "answers" / f"{method}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", ["overall", "mt_bench", "qa"])
def test_results_equal_speed_py_on_the_answer_files(bench, task):
    results, out, count = bench
    assert results["spec_bench_baseline"] == "hf-greedy"  # Spec-Bench's vanilla baseline is HF generate
    for method in ("ar", "bpd-full", "hf-greedy"):
        mat, speedup = speed_py(_answers(out, method), _answers(out, "hf-greedy"), count, task)
        ours = results["methods"][method]["spec_bench"][task]
        assert ours["speedup"] == pytest.approx(speedup, rel=1e-12)
        assert ours["mean_accepted_tokens"] == pytest.approx(mat, rel=1e-12)
    spec = {m: results["methods"][m]["spec_bench"][task] for m in results["methods"]}
    assert spec["ar"]["mean_accepted_tokens"] == spec["hf-greedy"]["mean_accepted_tokens"] == 1.0
    assert spec["bpd-full"]["mean_accepted_tokens"] == pytest.approx(results["methods"]["bpd-full"]["overall"][
        "block_efficiency"] if task == "overall" else spec["bpd-full"]["mean_accepted_tokens"])


def test_results_md_shows_them(bench):
    results, out, _ = bench
    md = (out / "results.md").read_text()
    assert "speed.py" in md and "#Mean accepted tokens" in md
    row = next(line for line in md.split("### Speed-up")[1].splitlines() if line.startswith("| bpd-full"))
    assert f"{results['methods']['bpd-full']['spec_bench']['overall']['speedup']:.2f}" in row


def test_per_answer_rates_are_averaged_not_pooled():
    """Two answers: 10 tokens in 1 s and 10 tokens in 4 s average 6.25 tokens/s (pooled: 4)."""
    rec = lambda q, n, s, text="": SimpleNamespace(question_id=q, turn=0, ids=[0] * n, seconds=s,
                                                   committed=[2] * (n // 2), text=text, category="qa")
    rows = [rec(1, 10, 1.0), rec(2, 10, 4.0)]
    base = [rec(1, 0, 2.0, "x" * 9), rec(2, 0, 2.0, "x" * 5)]  # counted as 8 and 4 tokens (len - 1)
    got = metrics(rows, base, count_tokens=len)
    assert got["tokens_per_s"] == 6.25 and got["tokens_per_s_baseline"] == 3.0
    assert got["speedup"] == pytest.approx(6.25 / 3.0) and got["mean_accepted_tokens"] == 2.0
    assert metrics(rows, base, count_tokens=None)["speedup"] is None


def test_baseline_choice():
    from blockdraft.bench.specbench import baseline
    assert baseline(["ar", "bpd", "hf-greedy"]) == "hf-greedy" and baseline(["bpd", "ar"]) == "ar"
    assert baseline(["bpd"]) is None
