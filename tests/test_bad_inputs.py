"""Table-driven bad inputs, each through the CLI (one line on stderr, exit 2, nothing written)
and the Python API (one BlockdraftError line): no traceback reaches the user."""
import pytest
import torch

import blockdraft
from blockdraft.cli import main
from blockdraft.errors import BlockdraftError


@pytest.fixture(scope="module")
def files(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("files")
    (root / "binary.jsonl").write_bytes(b"\x80\x81\xfe\xff\x00garbage\n")
    (root / "a-file").write_text("x")
    truncated = root / "truncated"
    truncated.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (model_dir / name).exists():
            (truncated / name).write_bytes((model_dir / name).read_bytes())
    whole = (model_dir / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(whole[: len(whole) // 3])
    return root


CLI_CASES = [
    ("binary prompts (bench)", ["bench", "--prompts", "{files}/binary.jsonl", "--out", "{tmp}/o"], "binary.jsonl"),
    ("binary prompts (distill)", ["distill", "--prompts", "{files}/binary.jsonl", "--out", "{tmp}/o"], "binary.jsonl"),
    ("out is a file (bench)", ["bench", "--out", "{files}/a-file"], "is a file"),
    ("out is a file (analyze)", ["analyze", "--out", "{files}/a-file"], "is a file"),
    ("out under a file", ["bench", "--out", "{files}/a-file/sub"], "a-file"),
    ("invalid UTF-8 in the prompt", ["generate", "--prompt", "bad \udcff byte"], "UTF-8"),
    ("truncated safetensors", ["generate", "--model", "{files}/truncated", "--prompt", "hi"], "truncated"),
    ("5,000-character model", ["generate", "--model", "m" * 5000, "--prompt", "hi"], "model"),
    ("cuda on a CPU machine", ["generate", "--device", "cuda", "--prompt", "hi"], "cuda"),
    ("p = 0", ["generate", "--method", "bpd-ngram-p0", "--prompt", "hi"], "p is a whole number"),
    ("huge p", ["generate", "--method", "bpd-ngram-p99999", "--prompt", "hi"], "p is a whole number"),
    ("1,500 suffixes", ["generate", "--method", "bpd" + "-fit" * 1500, "--prompt", "hi"], "characters"),
    ("ar-fit", ["generate", "--method", "ar-fit", "--prompt", "hi"], "ar has no drafts"),
    ("lookup-fit", ["generate", "--method", "lookup-fit", "--prompt", "hi"], "lookup takes no suffix"),
    ("empty stop", ["generate", "--model", "{model}", "--prompt", "hi", "--stop", ""], "stop string must not be empty"),
    ("negative budget", ["generate", "--model", "{model}", "--prompt", "hi", "--max-new-tokens", "-3"], "max_new_tokens"),
]


@pytest.mark.parametrize("argv, words", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line(argv, words, files, model_dir, tmp_path, capsys, monkeypatch):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    argv = [a.format(files=files, tmp=tmp_path, model=model_dir) for a in argv]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert words.lower() in err.lower(), err
    assert not (tmp_path / "o").exists()  # nothing written


API_CASES = [
    ("prompt a number", dict(prompt=123), "prompt"),
    ("ids of strings", dict(ids=["a", "b"]), "ids"),
    ("ids out of the vocabulary", dict(ids=[1, 10 ** 6]), "ids"),
    ("budget a string", dict(prompt="hi", max_new_tokens="5"), "max_new_tokens"),
    ("budget a float", dict(prompt="hi", max_new_tokens=2.5), "max_new_tokens"),
    ("method a number", dict(prompt="hi", method=5), "method"),
    ("stop a number", dict(prompt="hi", stop=5), "stop"),
    ("system a list", dict(prompt="hi", system=["x"]), "system"),
    ("temperature a list", dict(prompt="hi", temperature=[1]), "temperature"),
]


@pytest.mark.parametrize("kwargs, words", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_wrong_types_are_one_line(model_dir, kwargs, words):
    dec = blockdraft.load(str(model_dir))
    with pytest.raises(BlockdraftError, match=words) as caught:
        dec.generate(**{"method": "ar", **kwargs})
    assert "\n" not in str(caught.value)
