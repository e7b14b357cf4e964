"""Corrupt checkpoints and resources are refused at load, in one line naming the file and the fault."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from blockdraft.errors import BlockdraftError
from blockdraft.heads import load_heads
from blockdraft.models import load_model
from blockdraft.refine.neural import load_rescorer
from blockdraft.refine.ngram import NgramLM, train_ngram
from blockdraft.testing import random_heads, tiny_llama, tiny_tokenizer


def one_line(call, *pattern: str) -> str:
    """Run `call`; it must raise a one-line BlockdraftError holding every pattern."""
    with pytest.raises(BlockdraftError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    for part in pattern:
        assert part in message, (part, message)
    return message


def _first_matrix(state):
    return next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 2)


def _set(state, key, value):
    state[key] = value
    return []


def _poison(value):
    def edit(state):
        state[_first_matrix(state)][0, 0] = value
        return [_first_matrix(state)]
    return edit


def _drop(state):
    key = _first_matrix(state)
    state.pop(key)
    return [f"missing tensor {key!r}"]


def _reshape(state):
    key = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 1)
    state[key] = torch.zeros(7)
    return [key, "shape [7]"]


HEADS_STATE = [  # (id, edit of the saved tensors -> more expected words, expected words)
    ("vocab-past-the-end", lambda s: _set(s, "draft_vocab", torch.tensor([1, 5, 9, 70000])), ["draft_vocab", "70000", "64-token"]),
    ("vocab-negative", lambda s: _set(s, "draft_vocab", torch.tensor([1, -5, 9, 3])), ["draft_vocab", "-5"]),
    ("vocab-float", lambda s: _set(s, "draft_vocab", torch.tensor([1.0, 5.0, 9.0, 3.0])), ["integer token ids"]),
    ("nan", _poison(float("nan")), ["holds NaN"]),
    ("inf", _poison(float("inf")), ["holds inf"]),
    ("missing-tensor", _drop, []),
    ("extra-tensor", lambda s: _set(s, "bogus.weight", torch.zeros(2)), ["unexpected tensor 'bogus.weight'"]),
    ("wrong-shape", _reshape, []),
]

HEADS_CONFIG = [  # (id, new config.json content, expected words)
    ("null", lambda r: None, ["expected a JSON object, found null"]),
    ("number", lambda r: 3, ["expected a JSON object, found 3"]),
    ("string", lambda r: "heads", ['found "heads"']),
    ("list", lambda r: [r], ["expected a JSON object"]),
    ("num-heads-text", lambda r: {**r, "num_heads": "3"}, ["num_heads must be int"]),
    ("num-heads-zero", lambda r: {**r, "num_heads": 0}, ["num_heads must be positive"]),
    ("hidden-float", lambda r: {**r, "hidden_size": 32.5}, ["hidden_size must be int"]),
    ("vocab-null", lambda r: {**r, "vocab_size": None}, ["vocab_size must be int"]),
    ("chain-text", lambda r: {**r, "chain": "no"}, ["chain must be bool"]),
    ("training-list", lambda r: {**r, "training": [1]}, ["training must be dict"]),
    ("unknown-field", lambda r: {**r, "bogus": 1}, ["unknown field 'bogus'"]),
    ("missing-field", lambda r: {k: v for k, v in r.items() if k != "hidden_size"}, ["missing field 'hidden_size'"]),
    ("other-format", lambda r: {**r, "format": "medusa"}, ["format 'medusa'"]),
    ("draft-vocab-size", lambda r: {**r, "draft_vocab_size": 7}, ["draft_vocab has shape [4]"]),
]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(0)


def _saved_heads(model, folder):
    heads = random_heads(model, 3, chain=True)
    heads.set_draft_vocab(torch.tensor([1, 5, 9, 33]))
    heads.save(folder, dtype=torch.float32)
    return folder


@pytest.mark.parametrize(("edit", "words"), [c[1:] for c in HEADS_STATE], ids=[c[0] for c in HEADS_STATE])
def test_corrupt_head_weights(model, tmp_path, edit, words):
    folder = _saved_heads(model, tmp_path / "h")
    state = load_file(str(folder / "heads.safetensors"))
    words = words + edit(state)
    save_file(state, str(folder / "heads.safetensors"))
    one_line(lambda: load_heads(folder), "corrupt", "heads.safetensors", *words)


@pytest.mark.parametrize(("edit", "words"), [c[1:] for c in HEADS_CONFIG], ids=[c[0] for c in HEADS_CONFIG])
def test_corrupt_head_configs(model, tmp_path, edit, words):
    folder = _saved_heads(model, tmp_path / "h")
    raw = json.loads((folder / "config.json").read_text())
    raw = edit(raw)
    (folder / "config.json").write_text(json.dumps(raw))
    where = "heads.safetensors" if words[0].startswith("draft_vocab has") else "config.json"  # the layout is the weights'
    one_line(lambda: load_heads(folder), "corrupt", where, *words)


def test_truncated_and_binary_head_files(model, tmp_path):
    folder = _saved_heads(model, tmp_path / "h")
    whole = (folder / "heads.safetensors").read_bytes()
    (folder / "heads.safetensors").write_bytes(whole[: len(whole) // 2])
    one_line(lambda: load_heads(folder), "heads.safetensors", "not a complete safetensors file")
    (folder / "heads.safetensors").write_bytes(whole)
    (folder / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    one_line(lambda: load_heads(folder), "config.json", "not a JSON file")


@pytest.fixture(scope="module")
def ngram_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ngram") / "lm.npz"
    train_ngram([[1, 2, 3, 4, 5, 6] * 3, [7, 8, 9, 1, 2]], 3, vocab_size=64).save(path)
    return path


def _meta(**change):
    def edit(z):
        z["meta"] = np.array(json.dumps({**json.loads(str(z["meta"])), **change}))
    return edit


NGRAM = [
    ("nan-logprob", lambda z: z["lp2"].__setitem__(0, np.nan), ["lp2 holds NaN or inf"]),
    ("inf-unigram", lambda z: z["uni_lp"].__setitem__(3, np.inf), ["uni_lp holds NaN or inf"]),
    ("inf-backoff", lambda z: z["bow2"].__setitem__(0, -np.inf), ["bow2 holds NaN or inf"]),
    ("positive-logprob", lambda z: z["lp3"].__setitem__(0, 5.0), ["lp3 holds log-probabilities above 0"]),
    ("meta-null", lambda z: z.__setitem__("meta", np.array("null")), ["metadata must be a JSON object, found null"]),
    ("meta-number", lambda z: z.__setitem__("meta", np.array("3")), ["metadata must be a JSON object, found 3"]),
    ("order-text", _meta(order="x"), ["order must be a positive integer"]),
    ("order-zero", _meta(order=0), ["order must be a positive integer"]),
    ("vocab-float", _meta(vocab_size=64.5), ["vocab_size must be a positive integer"]),
    ("alpha-text", _meta(alpha="x"), ["alpha must map domains to numbers"]),
    ("alpha-negative", _meta(alpha={"default": -1}), ["alpha must map domains to numbers"]),
    ("seen-float", lambda z: z.__setitem__("uni_seen", z["uni_seen"].astype(np.float64)), ["uni_seen must be boolean"]),
    ("table-2d", lambda z: z.__setitem__("lp2", z["lp2"][:, None]), ["lp2 must be a 1-D float array"]),
    ("keys-unsorted", lambda z: z.__setitem__("keys2", z["keys2"][::-1].copy()), ["corrupt 2-gram table"]),
]


@pytest.mark.parametrize(("edit", "words"), [c[1:] for c in NGRAM], ids=[c[0] for c in NGRAM])
def test_corrupt_ngram_files(ngram_file, tmp_path, edit, words):
    tables = dict(np.load(ngram_file))
    edit(tables)
    path = tmp_path / "bad.npz"
    with open(path, "wb") as f:
        np.savez(f, **tables)
    one_line(lambda: NgramLM.load(path, vocab_size=64), str(path), *words)


def test_truncated_ngram_file_and_the_good_one(ngram_file, tmp_path):
    assert NgramLM.load(ngram_file, vocab_size=64).order == 3
    whole = ngram_file.read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])
    one_line(lambda: NgramLM.load(tmp_path / "cut.npz", vocab_size=64), "cut.npz", "not a readable")


@pytest.fixture(scope="module")
def rescorer_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rescorer") / "r"
    tiny_llama(5, torch.float32).save_pretrained(folder)
    (folder / "rescorer.json").write_text(json.dumps({"alpha": {"default": 1.0}}))
    return folder


def _rewrite_weights(edit):
    def apply(folder):
        state = load_file(str(folder / "model.safetensors"))
        edit(state)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return apply


def _cut(name, keep):
    def apply(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:keep] if keep > 0 else data[: len(data) // 2])
    return apply


def _write(name, text):
    return lambda folder: (folder / name).write_text(text)


RESCORER = [
    ("meta-null", _write("rescorer.json", "null"), ["rescorer.json", "expected a JSON object"]),
    ("meta-text", _write("rescorer.json", '"x"'), ["rescorer.json", "expected a JSON object"]),
    ("alpha-text", _write("rescorer.json", '{"alpha": "x"}'), ["rescorer.json", "alpha must map"]),
    ("alpha-null", _write("rescorer.json", '{"alpha": {"default": null}}'), ["rescorer.json", "alpha must map"]),
    ("nan-weight", _rewrite_weights(lambda s: s["lm_head.weight"].__setitem__((0, 0), float("nan"))), ["lm_head.weight", "NaN"]),
    ("truncated", _cut("model.safetensors", 0), ["model.safetensors", "not a complete safetensors file"]),
    ("config-null", _write("config.json", "null"), ["config.json", "expected a JSON object"]),
    ("config-text", _write("config.json", '"x"'), ["config.json", "expected a JSON object"]),
]


@pytest.mark.parametrize(("edit", "words"), [c[1:] for c in RESCORER], ids=[c[0] for c in RESCORER])
def test_corrupt_rescorers(rescorer_folder, tmp_path, edit, words):
    folder = tmp_path / "r"
    shutil.copytree(rescorer_folder, folder)
    edit(folder)
    one_line(lambda: load_rescorer(folder), "corrupt", *words)


def test_rescorer_for_a_smaller_vocabulary(rescorer_folder):
    assert load_rescorer(rescorer_folder, vocab_size=64).alpha == {"default": 1.0}
    one_line(lambda: load_rescorer(rescorer_folder, vocab_size=100), "scores 64 token ids, fewer than the model's 100")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "m"
    tiny_llama(1, torch.float32).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


MODEL = [
    ("truncated", _cut("model.safetensors", 0), ["model.safetensors", "not a complete safetensors file"]),
    ("header-only", _cut("model.safetensors", 20), ["model.safetensors", "not a complete safetensors file"]),
    ("config-null", _write("config.json", "null"), ["config.json", "expected a JSON object, found null"]),
    ("config-number", _write("config.json", "12"), ["config.json", "expected a JSON object, found 12"]),
    ("config-binary", lambda f: (f / "config.json").write_bytes(b"\xff\x00\x01"), ["config.json", "not a JSON file"]),
    ("nan-weight", _rewrite_weights(lambda s: s["lm_head.weight"].__setitem__((0, 0), float("nan"))), ["lm_head.weight holds NaN"]),
    ("inf-weight", _rewrite_weights(lambda s: s["model.norm.weight"].__setitem__(0, float("-inf"))), ["model.norm.weight holds inf"]),
]


@pytest.mark.parametrize(("edit", "words"), [c[1:] for c in MODEL], ids=[c[0] for c in MODEL])
def test_corrupt_model_folders(model_folder, tmp_path, edit, words):
    folder = tmp_path / "m"
    shutil.copytree(model_folder, folder)
    edit(folder)
    one_line(lambda: load_model(str(folder)), *words)


def test_model_names_the_file_system_refuses(model_folder):
    assert load_model(str(model_folder)).model.config.vocab_size == 64
    one_line(lambda: load_model("m" * 5000), "cannot load model", "...", "File name too long")
    one_line(lambda: load_model(""), "model must be a non-empty name or path")
    one_line(lambda: load_model(None), "model must be a non-empty name or path")
