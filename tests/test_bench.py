"""`blockdraft bench` on a tiny random Llama: schema, step counting, losslessness, files."""
import hashlib
import importlib.util
import json

import pytest
import torch

from blockdraft.bench import DEFAULT_PROMPTS, load_questions, run_bench
from blockdraft.bench.runner import call_log, measure, setup
from blockdraft.cli import build_parser, main
from blockdraft.errors import BlockdraftError
from blockdraft.testing import tiny_decoder

METHODS = ["ar", "bpd", "hf-greedy", "hf-pld"]
QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a short poem about the sky.", "Now explain it."]},
    {"question_id": 2, "category": "qa", "turns": ["Name three rivers."]},
    {"question_id": 3, "category": "math", "turns": ["What is one and two?"]},
]
SUMMARY_KEYS = {"block_efficiency", "tokens_per_s", "speedup_vs_ar", "lossless_rate", "prompts", "new_tokens", "steps",
                "seconds", "mean_accepted", "forward_seconds", "draft_seconds"}
ENV_KEYS = {"model", "heads", "versions", "cpu", "torch_threads", "date", "python", "peak_rss_mb"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices on busy shared cores: one thread avoids contention (and bench records it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def decoder():
    return tiny_decoder(seed=0, num_heads=3)


@pytest.fixture(scope="module")
def bench(decoder, tmp_path_factory):
    """One small bench run shared by the tests; records the conversations each turn was asked in."""
    out = tmp_path_factory.mktemp("bench")
    asked, encode = [], decoder.encode

    def spy(turns, answers=None, raw=False):
        asked.append((list(turns), list(answers or [])))
        return encode(turns, answers, raw)

    decoder.encode = spy
    try:
        results = run_bench(decoder, QUESTIONS, METHODS, 8, out, argv=["bench", "--max-new-tokens", "8"])
    finally:
        del decoder.encode
    return results, out, asked


def _answers(out, method):
    return [json.loads(line) for line in (out / "answers" / f"{method}.jsonl").read_text().splitlines()]


def test_results_schema(bench):
    results, out, _ = bench
    assert json.loads((out / "results.json").read_text()) == results
    assert set(results["methods"]) == set(METHODS)
    assert ENV_KEYS <= set(results["environment"]) and results["environment"]["torch_threads"] == 1
    assert {"torch", "transformers", "numpy", "blockdraft"} <= set(results["environment"]["versions"])
    for name, entry in results["methods"].items():
        assert SUMMARY_KEYS <= set(entry["overall"])
        assert all(SUMMARY_KEYS <= set(s) for s in entry["by_category"].values())
        assert entry["added_memory_mb"] >= 0
        ours = name in ("ar", "bpd")
        assert (entry["overall"]["mean_accepted"] is not None) == ours
        assert (entry["overall"]["forward_seconds"] is not None) == ours
        ttft = entry["overall"]["ttft_s"]
        assert (ttft is not None) == ours and (not ours or 0 < ttft < entry["overall"]["seconds"])
    text = (out / "results.md").read_text()
    assert "blockdraft bench --max-new-tokens 8" in text and "| bpd |" in text and "Time to first token" in text
    for png in ("block_efficiency.png", "speedup.png", "committed_per_step.png"):
        assert (out / png).stat().st_size > 0


def test_baselines_and_losslessness(bench):
    methods = bench[0]["methods"]
    assert methods["ar"]["overall"]["block_efficiency"] == 1.0
    assert methods["hf-greedy"]["overall"]["block_efficiency"] == 1.0
    assert methods["hf-greedy"]["overall"]["lossless_rate"] == 1.0
    assert methods["bpd"]["overall"]["lossless_rate"] == 1.0
    assert methods["ar"]["overall"]["speedup_vs_ar"] == 1.0
    assert methods["bpd"]["overall"]["block_efficiency"] >= 1.0


def test_mt_bench_group(bench):
    results, out, _ = bench
    cats = results["methods"]["ar"]["by_category"]
    assert set(cats) == {"writing", "qa", "math", "mt_bench"}
    assert cats["mt_bench"]["prompts"] == 2 and cats["mt_bench"]["turns"] == 3
    assert cats["mt_bench"]["new_tokens"] == cats["writing"]["new_tokens"] + cats["math"]["new_tokens"]
    assert results["categories"] == {"writing": "mt_bench", "qa": "qa", "math": "mt_bench"}
    assert "| method | overall | mt_bench | qa |" in (out / "results.md").read_text()


def test_multi_turn_feeds_back_own_answer(bench):
    _, out, asked = bench
    second = {tuple(answers) for turns, answers in asked if len(turns) == 2}
    assert second == {(_answers(out, m)[0]["choices"][0]["turns"][0],) for m in METHODS}


def test_answers_jsonl(bench):
    results, out, _ = bench
    for method in METHODS:
        rows = _answers(out, method)
        assert [r["question_id"] for r in rows] == [1, 2, 3]
        for row, q in zip(rows, QUESTIONS):
            assert {"question_id", "category", "model_id", "choices", "tstamp"} <= set(row)
            assert row["category"] == q["category"] and row["model_id"] == f"tiny-{method}"
            choice = row["choices"][0]
            assert choice["index"] == 0
            assert len(choice["turns"]) == len(choice["new_tokens"]) == len(choice["wall_time"]) == len(q["turns"])
            assert sum(choice["accept_lengths"]) == sum(choice["new_tokens"])  # committed tokens per step
        assert sum(len(r["choices"][0]["accept_lengths"]) for r in rows) == results["methods"][method]["overall"]["steps"]


@pytest.mark.parametrize("method", ["ar", "bpd", "hf-pld"])
@pytest.mark.parametrize("ids", [[5], [0, 54, 30, 4, 50, 41, 1, 0, 55]])
def test_hook_steps_match(decoder, method, ids):
    """Steps counted by the forward hook equal the engine's own count (and, for HF, every call)."""
    runners, _ = setup(decoder, [method])
    log = call_log(decoder)
    try:
        record = measure(decoder, log, method, runners[method], ids, 8, QUESTIONS[0], 0)  # checks engine steps
        calls = len(log.widths)
    finally:
        log.close()
    if method == "hf-pld":
        assert record.steps == calls
    else:
        assert record.steps == decoder.generate(ids=ids, method=method, max_new_tokens=8).steps
        assert calls == record.steps + (len(ids) > 1)
    assert sum(record.committed) == len(record.ids) and min(record.committed) >= 1


def test_added_memory_counts_heads_not_base_model(bench, decoder):
    memory = {m: e["memory"] for m, e in bench[0]["methods"].items()}
    head_bytes = sum(p.numel() * p.element_size() for p in decoder.heads.parameters())
    assert memory["bpd"]["weights_mb"] * 2**20 == head_bytes  # the shared lm_head is not counted
    assert memory["ar"]["weights_mb"] == memory["hf-greedy"]["weights_mb"] == 0
    assert memory["ar"]["peak_tree_nodes"] == 1


def test_unknown_method(decoder, tmp_path):
    with pytest.raises(BlockdraftError, match="no-such-method"):
        run_bench(decoder, QUESTIONS[:1], ["ar", "no-such-method"], 4, tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None, reason="llama-cpp-python is installed")
def test_llamacpp_skipped_without_extra(decoder, tmp_path):
    results = run_bench(decoder, QUESTIONS[1:2], ["ar", "llamacpp"], 4, tmp_path)
    assert list(results["methods"]) == ["ar"] and "llama-cpp-python" in results["config"]["skipped"]["llamacpp"]


def test_bad_prompt_file(tmp_path, capsys):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(QUESTIONS[0]) + "\n" + '{"question_id": 9, "category": "qa"}\n')
    with pytest.raises(BlockdraftError, match=r"q.jsonl:2: 'turns'"):
        load_questions(path)
    path.write_text(json.dumps(QUESTIONS[0]) + "\n\n{not json\n")
    assert main(["bench", "--prompts", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "q.jsonl:3: invalid JSON" in err[0]
    path.write_text(json.dumps(QUESTIONS[0]) + "\n" + json.dumps(QUESTIONS[0]) + "\n")
    with pytest.raises(BlockdraftError, match=r":2: duplicate question_id"):
        load_questions(path)


def test_selection_on_bundled_prompts():
    assert hashlib.sha256(DEFAULT_PROMPTS.read_bytes()).hexdigest().startswith("2b55b0ac153d4cbd")
    assert (DEFAULT_PROMPTS.parent / "PROVENANCE.md").exists()
    everything = load_questions()
    assert len(everything) == 240 and all(q["question_id"] % 2 == 0 for q in everything)
    one_each = load_questions(per_category=1)
    assert len(one_each) == 13 and len({q["category"] for q in one_each}) == 13
    assert len(load_questions(categories=["mt_bench"])) == 40
    picked = load_questions(categories=["mt_bench", "qa"], per_category=2, limit=5)
    assert [q["category"] for q in picked] == ["writing", "writing", "roleplay", "roleplay", "reasoning"]
    assert [q["category"] for q in load_questions(categories=["qa"], per_category=3)] == ["qa"] * 3
    with pytest.raises(BlockdraftError, match="no-such-category"):
        load_questions(categories=["no-such-category"])


def test_cli_parser():
    args = build_parser().parse_args(["bench", "--out", "x"])
    assert args.methods == "ar,bpd,fast,hf-greedy,hf-pld" and args.max_new_tokens == 128
    assert args.prompts == str(DEFAULT_PROMPTS) and args.threads is None
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", "--help"])
    assert exit_info.value.code == 0


def _records(out):
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def test_resume_measures_only_the_unfinished_questions(decoder, tmp_path):
    """A run killed mid-question (half a line written) resumes with its finished questions kept."""
    first = run_bench(decoder, QUESTIONS, ["ar", "bpd"], 6, tmp_path)
    rows = _records(tmp_path)
    assert [r["question_id"] for r in rows] == [1, 1, 1, 1, 2, 2, 3, 3]  # question by question, all turns
    kept = [json.dumps(r) for r in rows[:4]]  # question 1 done, question 2 cut by a kill
    (tmp_path / "records.jsonl").write_text("\n".join(kept + [json.dumps(rows[4]), json.dumps(rows[5])[:40]]) + "\n")
    asked, run = [], decoder.generate

    def spy(*args, **kwargs):
        asked.append(kwargs["ids"])
        return run(*args, **kwargs)

    decoder.generate = spy
    try:
        again = run_bench(decoder, QUESTIONS, ["ar", "bpd"], 6, tmp_path, resume=True)
    finally:
        del decoder.generate
    assert len(asked) == 2 + 2 * 2  # warm-up and questions 2, 3 for both methods; question 1 kept
    assert again["config"]["resumed_questions"] == 1 and again["config"]["questions"] == 3
    assert [r["question_id"] for r in _records(tmp_path)] == [1, 1, 1, 1, 2, 2, 3, 3]
    for name in ("ar", "bpd"):
        assert again["methods"][name]["overall"]["new_tokens"] == first["methods"][name]["overall"]["new_tokens"]
    assert again["methods"]["bpd"]["overall"]["lossless_rate"] == 1.0


def test_a_folder_of_another_run_is_refused(decoder, tmp_path):
    run_bench(decoder, QUESTIONS[1:2], ["ar"], 4, tmp_path)
    with pytest.raises(BlockdraftError, match="is not empty .*--resume continues the run there"):
        run_bench(decoder, QUESTIONS[1:2], ["ar"], 4, tmp_path)
    with pytest.raises(BlockdraftError, match="other methods, max_new_tokens"):
        run_bench(decoder, QUESTIONS[1:2], ["bpd"], 5, tmp_path, resume=True)
    (tmp_path / "run.json").unlink()  # records of a run that predates run.json: never overwritten
    with pytest.raises(BlockdraftError, match="holds no run to resume"):
        run_bench(decoder, QUESTIONS[1:2], ["ar"], 4, tmp_path, resume=True)


def test_user_files_are_never_overwritten(decoder, tmp_path):
    """A folder holding anything a bench run does not write is refused, with --resume too; nothing is touched."""
    (tmp_path / "results.md").write_text("my notes")
    (tmp_path / "answers").mkdir()
    for resume in (False, True):
        with pytest.raises(BlockdraftError, match="is not empty|holds no run to resume"):
            run_bench(decoder, QUESTIONS[1:2], ["ar"], 4, tmp_path, resume=resume)
    assert (tmp_path / "results.md").read_text() == "my notes" and not (tmp_path / "records.jsonl").exists()
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(BlockdraftError, match="mine.txt"):
        run_bench(decoder, QUESTIONS[1:2], ["ar"], 4, tmp_path, resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BlockdraftError, match="is a file"):
        run_bench(decoder, QUESTIONS[1:2], ["ar"], 4, tmp_path / "file")


def test_two_runs_cannot_write_one_folder(decoder, tmp_path):
    from blockdraft.outdir import LOCK, FolderLock

    with FolderLock(tmp_path / "run"):
        for name in ("records.jsonl", "run.json"):
            (tmp_path / "run" / name).write_text("")
        with pytest.raises(BlockdraftError, match="another run .* is writing"):
            run_bench(decoder, QUESTIONS[1:2], ["ar"], 4, tmp_path / "run", resume=True)
        for name in ("records.jsonl", "run.json"):
            (tmp_path / "run" / name).unlink()
    (tmp_path / "run" / LOCK).write_text("999999999\n")  # left by a process that is gone: taken over
    run_bench(decoder, QUESTIONS[1:2], ["ar"], 4, tmp_path / "run")
    assert not (tmp_path / "run" / LOCK).exists()


def test_time_budget_stops_after_a_question_and_reports_it(decoder, tmp_path, capsys):
    results = run_bench(decoder, QUESTIONS, ["ar"], 4, tmp_path, max_minutes=1e-9)
    assert results["config"]["questions"] == 1 and results["config"]["questions_asked"] == 3
    assert results["methods"]["ar"]["overall"]["prompts"] == 1
    assert "--resume measures the rest" in capsys.readouterr().err
    assert "1 of 3 (stopped by --max-minutes" in (tmp_path / "results.md").read_text()
    rest = run_bench(decoder, QUESTIONS, ["ar"], 4, tmp_path, resume=True)
    assert rest["methods"]["ar"]["overall"]["prompts"] == 3


def test_round_robin_takes_categories_in_turn():
    from blockdraft.bench.runner import round_robin

    qs = [{"question_id": i, "category": c} for i, c in enumerate("aaabbc")]
    assert [q["question_id"] for q in round_robin(qs)] == [0, 3, 5, 1, 4, 2]


def test_sampled_bench_repeats_by_seed_is_lossless_and_skips_the_greedy_peers(decoder, tmp_path):
    from blockdraft.sampling import Sampling

    runs = [run_bench(decoder, QUESTIONS[1:], ["ar", "bpd", "hf-pld"], 12, tmp_path / name,
                      sampling=Sampling(temperature=0.9)) for name in ("a", "b")]
    assert all(list(r["methods"]) == ["ar", "bpd"] and "greedy" in r["config"]["skipped"]["hf-pld"] for r in runs)
    assert runs[0]["config"]["sampling"] == {"temperature": 0.9, "top_k": 0, "top_p": 1.0, "seed": 0}
    assert all(r["methods"][m]["overall"]["lossless_rate"] == 1.0 for r in runs for m in ("ar", "bpd"))
    texts = [[[c["turns"] for a in _answers(tmp_path / name, m) for c in a["choices"]] for m in ("ar", "bpd")]
             for name in ("a", "b")]
    assert texts[0] == texts[1] and texts[0][0] == texts[0][1]  # one seed: one text, for every method
    assert "sampling: temperature 0.9" in (tmp_path / "a" / "results.md").read_text()
    greedy = run_bench(decoder, QUESTIONS[1:], ["ar"], 12, tmp_path / "g")
    assert greedy["config"]["sampling"] is None and greedy["methods"]["ar"]["overall"]["lossless_rate"] == 1.0
    assert [c["turns"] for a in _answers(tmp_path / "g", "ar") for c in a["choices"]] != texts[0][0]


def test_each_methods_peak_memory_is_measured_in_a_process_of_its_own(model_dir):
    from blockdraft.bench.memory import own_process_peaks

    ballast = bytearray(1 << 30)  # this process's peak passes 1 GiB; the child's own must not inherit it
    ballast[:: 4096] = b"\1" * len(ballast[:: 4096])
    peaks = own_process_peaks({"model": str(model_dir), "heads": None, "threads": 1}, ["ar", "bpd"], [3, 5, 7], 4)
    assert 50 < peaks["ar"]["peak_rss_mb"] < 1000  # python, torch and a tiny model, in a process of its own
    assert "heads" in peaks["bpd"]["error"]  # the tiny folder has no heads: one line, not a crash


def test_the_openvino_ir_is_cached_and_a_folder_without_a_model_is_one_line(tmp_path):
    from blockdraft.bench.openvino import WEIGHTS, ir_folder
    from blockdraft.errors import BlockdraftError

    cached = tmp_path / "openvino" / f"abc-{WEIGHTS}"
    cached.mkdir(parents=True)
    for name in ("openvino_model.xml", "openvino_tokenizer.xml"):
        (cached / name).write_text("<net/>")
    assert ir_folder(tmp_path / "nowhere", "abc", tmp_path) == cached  # exported once, never again
    with pytest.raises(BlockdraftError, match="config.json"):
        ir_folder(tmp_path / "nowhere", "other", tmp_path)
    assert not (tmp_path / "openvino" / "export-tools").exists()  # nothing installed for a bad folder


def test_a_peer_failing_on_one_prompt_is_reported_and_the_run_goes_on(decoder, tmp_path, monkeypatch, capsys):
    from blockdraft.bench import runner

    def flaky_peer(dec, name):
        run = runner._hf(dec, name)

        def maybe(ids, max_new_tokens):
            if dec.tokenizer.decode(ids).count("rivers"):
                raise RuntimeError("llama_decode returned -1\nsecond line")
            return run(ids, max_new_tokens)
        return maybe

    monkeypatch.setitem(runner.RUNNERS, "hf-greedy", flaky_peer)
    results = run_bench(decoder, QUESTIONS, ["ar", "hf-greedy"], 8, tmp_path / "out")
    peer = results["methods"]["hf-greedy"]
    assert peer["failed_turns"] == [{"question_id": 2, "turn": 0, "error": "RuntimeError: llama_decode returned -1"}]
    assert peer["overall"]["turns"] == 3 and peer["overall"]["lossless_rate"] == 1.0
    assert results["methods"]["ar"]["failed_turns"] == [] and results["methods"]["ar"]["overall"]["turns"] == 4
    assert "hf-greedy failed on question 2 turn 1" in capsys.readouterr().err
    assert "hf-greedy failed on 1 prompt-turn(s)" in (tmp_path / "out" / "results.md").read_text()
    assert [a["question_id"] for a in _answers(tmp_path / "out", "hf-greedy")] == [1, 3]
