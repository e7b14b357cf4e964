"""The command line's small conveniences: --version, --prompt - (stdin), --system (tiny saved model)."""
import io
import json

import pytest
import torch

import blockdraft
from blockdraft.cli import main
from blockdraft.testing import random_heads, tiny_llama

PROMPT = "write a short poem about the sky"


def _generate(model_dir, capsys, *extra: str) -> dict:
    assert main(["generate", "--model", str(model_dir), "--method", "ar", "--max-new-tokens", "8", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"blockdraft {blockdraft.__version__}"


def test_prompt_from_stdin(model_dir, capsys, monkeypatch):
    by_flag = _generate(model_dir, capsys, "--prompt", PROMPT)
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT + "\n"))
    by_stdin = _generate(model_dir, capsys, "--prompt", "-")
    assert by_stdin["text"] == by_flag["text"]
    monkeypatch.setattr("sys.stdin", io.StringIO("  \n"))
    assert main(["generate", "--model", str(model_dir), "--prompt", "-"]) == 2
    assert "empty prompt" in capsys.readouterr().err


def test_system_message_goes_through_the_chat_template(model_dir, capsys):
    dec = blockdraft.load(str(model_dir))
    with_system = dec.encode(PROMPT, system="answer in short text")
    assert with_system != dec.encode(PROMPT)
    text = dec.tokenizer.decode(with_system)  # the tiny vocabulary lacks "system": <unk>
    assert text.startswith("<|im_start|> <unk> answer in short text <|im_end|> <|im_start|> user write")
    out = _generate(model_dir, capsys, "--prompt", PROMPT, "--system", "answer in short text")
    assert out["text"] == dec.generate(ids=with_system, method="ar", max_new_tokens=8).text
    assert main(["generate", "--model", str(model_dir), "--prompt", PROMPT, "--system", "x", "--raw"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--raw" in err


def test_sampled_generate_is_reproducible_by_seed(model_dir, tmp_path, capsys):
    """--temperature/--top-k/--top-p/--seed reach the sampler: one seed, one output, through a drafting method."""
    heads = tmp_path / "heads"
    random_heads(tiny_llama(4, dtype=torch.float32), 3, seed=1).float().save(heads, dtype=torch.float32)
    args = ["--heads", str(heads), "--method", "bpd-full", "--max-new-tokens", "24", "--prompt", PROMPT,
            "--temperature", "0.7", "--top-k", "20", "--top-p", "0.95"]
    runs = [_generate(model_dir, capsys, *args, "--seed", "1") for _ in range(2)]
    assert runs[0]["text"] == runs[1]["text"] and runs[0]["seed"] == 1 and runs[0]["temperature"] == 0.7
    expected = blockdraft.load(str(model_dir), heads=str(heads)).generate(
        PROMPT, method="bpd-full", max_new_tokens=24, temperature=0.7, top_k=20, top_p=0.95, seed=1)
    assert runs[0]["text"] == expected.text
    fresh = _generate(model_dir, capsys, *args)
    assert _generate(model_dir, capsys, *args, "--seed", str(fresh["seed"]))["text"] == fresh["text"]
    assert _generate(model_dir, capsys, "--prompt", PROMPT)["seed"] is None  # greedy


@pytest.mark.parametrize("flag, value", [("--temperature", "-1"), ("--temperature", "hot"), ("--top-p", "0"),
                                         ("--top-p", "1.5"), ("--top-k", "-2"), ("--top-k", "2.5"),
                                         ("--seed", "x"), ("--seed", "-3"), ("--temperature", "nan")])
def test_bad_sampling_values_are_one_line_before_loading(flag, value, capsys):
    assert main(["generate", "--model", "/no/such/model", "--prompt", PROMPT, flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag.lstrip("-").replace("-", "") in err.replace("-", "") and "/no/such" not in err


@pytest.mark.parametrize("argv, words", [
    (["generate"], "the following arguments are required: --prompt"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "many"], "invalid int value"),
    (["nonsense"], "invalid choice"),
    (["bench", "--out", "x", "--limit", "-1"], "--limit must be a whole number >= 1"),
    (["bench", "--out", "x", "--per-category", "0"], "--per-category must be a whole number >= 1"),
    (["prompts", "--source", "x", "--out", "y", "--long-first", "-5"], "--long-first must be 0 or more"),
])
def test_usage_errors_are_one_line(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and words in err, err


def test_analyze_refuses_a_folder_that_holds_files_before_loading(tmp_path, capsys):
    (tmp_path / "analysis.md").write_text("my analysis")
    assert main(["analyze", "--model", "/no/such/model", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "/no/such" not in err and (tmp_path / "analysis.md").read_text() == "my analysis"


def test_calibrate_measures_the_cost_curve_and_json_names_the_resolved_method(model_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKDRAFT_CACHE", str(tmp_path))
    assert main(["calibrate", "--model", str(model_dir), "--threads", "1"]) == 0
    curve = json.loads(capsys.readouterr().out)
    assert curve["tokens"][0] == 1 and len(curve["ms"]) == len(curve["tokens"]) and curve["threads"] == 1
    assert curve["ms"] == sorted(curve["ms"])
    out = _generate(model_dir, capsys, "--prompt", PROMPT)
    assert out["resolved_method"] == "ar"
    from blockdraft.cpu import fast_bfloat16
    assert out["dtype"] == ("bfloat16" if fast_bfloat16() else "float32")  # --dtype auto
    assert main(["generate", "--model", str(model_dir), "--prompt", PROMPT, "--method", "fast", "--json",
                 "--max-new-tokens", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["resolved_method"] == "lookup"  # fast without heads
