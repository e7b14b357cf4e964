"""Models by absolute/relative path, hub id or alias; shipped assets only for their alias; the hub
only as the user allows, and no environment variable written (tiny models saved to disk)."""
import json
import os

import pytest
import torch

import blockdraft
from blockdraft import models
from blockdraft.cli import main
from blockdraft.errors import BlockdraftError
from blockdraft.models import Alias, load_model, model_fingerprint
from blockdraft.testing import random_heads, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama + tokenizer saved the way any HF model folder is (save_pretrained)."""
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    model = tiny_llama(3, dtype=torch.float32)
    model.save_pretrained(folder)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder


def test_absolute_and_relative_paths_load_the_same_model(model_dir, monkeypatch):
    by_abs = load_model(str(model_dir))
    monkeypatch.chdir(model_dir.parent)
    by_rel = load_model(os.path.join(".", model_dir.name))
    assert by_abs.fingerprint == by_rel.fingerprint == model_fingerprint(tiny_llama(3, dtype=torch.float32))
    assert by_abs.alias is None and by_abs.label == str(model_dir)  # no alias: no shipped assets, plain name


def test_model_by_path_has_no_shipped_assets(model_dir):
    dec = blockdraft.load(str(model_dir))
    assert dec.heads is None and dec.heads_path is None and dec.ngram_path is None and dec.rescorer_path is None
    ar = dec.generate("name three rivers", method="ar", max_new_tokens=8)
    assert dec.generate("name three rivers", method="lookup", max_new_tokens=8).ids == ar.ids
    assert dec.generate("name three rivers", method="fast", max_new_tokens=8).ids == ar.ids  # = lookup here
    with pytest.raises(BlockdraftError, match="--heads"):
        dec.generate("name three rivers", method="bpd", max_new_tokens=8)


def test_cli_generate_with_absolute_model_dir(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--method", "ar", "--prompt", "name three rivers",
                 "--max-new-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = blockdraft.load(str(model_dir)).generate("name three rivers", method="ar", max_new_tokens=6)
    assert out["text"] == expected.text and out["model"] == str(model_dir) and out["heads"] is None
    assert main(["generate", "--model", str(model_dir), "--method", "bpd", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--heads" in err


def test_folder_with_an_alias_weights_gets_its_shipped_assets(model_dir, tmp_path, monkeypatch):
    """A folder holding a known alias's weights (its dequantised cache, or a copy) is that alias."""
    model = tiny_llama(3, dtype=torch.float32)
    fingerprint = model_fingerprint(model)
    monkeypatch.setitem(models.ALIASES, "tiny-alias", Alias("none", "none", "none/none", "Q8_0", fingerprint))
    heads = random_heads(model, 2, seed=1).float()
    heads.config.base_fingerprint = fingerprint
    heads.save(tmp_path / "heads" / "tiny-alias", dtype=torch.float32)
    monkeypatch.setattr(blockdraft.api, "ASSETS", tmp_path)
    dec = blockdraft.load(str(model_dir))
    assert dec.loaded.alias == "tiny-alias" and dec.loaded.label == f"{model_dir} (Q8_0 GGUF, dequantised)"
    assert dec.heads_path == str(tmp_path / "heads" / "tiny-alias")
    ar = dec.generate("name three rivers", method="ar", max_new_tokens=10)
    assert dec.generate("name three rivers", method="bpd", max_new_tokens=10).ids == ar.ids
    monkeypatch.delitem(models.ALIASES, "tiny-alias")
    assert blockdraft.load(str(model_dir)).heads is None  # same folder, no alias: no shipped heads


def test_loading_writes_no_environment_variable(model_dir, monkeypatch):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    load_model(str(model_dir))
    with pytest.raises(BlockdraftError):
        load_model("blockdraft-tests/not-a-model", offline=True)
    assert dict(os.environ) == before


def test_hub_ids_follow_the_users_offline_choice(monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("offline: the hub must not be asked")

    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    with pytest.raises(BlockdraftError, match="hub is off"):
        load_model("blockdraft-tests/not-a-model", offline=True)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setenv(name, "1")
        with pytest.raises(BlockdraftError, match="hub is off"):
            load_model("blockdraft-tests/not-a-model")


def test_unreachable_hub_is_one_quick_line(monkeypatch):
    """Not offline and not cached: one request to the hub; its failure is the user's one line."""
    import huggingface_hub

    asked = []

    def unreachable(repo_id, timeout=None, **kwargs):
        asked.append((repo_id, timeout))
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    with pytest.raises(BlockdraftError, match="hub cannot be reached") as err:
        load_model("blockdraft-tests/not-a-model")
    assert "\n" not in str(err.value) and asked == [("blockdraft-tests/not-a-model", 10.0)]


@pytest.mark.parametrize("spec, why", [("/no/such/folder", "no such folder"), ("./missing/model/dir", "no such folder")])
def test_bad_specs_are_one_line(spec, why):
    with pytest.raises(BlockdraftError, match=why):
        load_model(spec)


def test_folder_without_config_and_file_are_refused(tmp_path):
    with pytest.raises(BlockdraftError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(BlockdraftError, match="is a file"):
        load_model(str(tmp_path / "weights.bin"))


@pytest.mark.slow
def test_default_alias_cache_folder_is_the_alias(capsys):
    """`--model <the default alias's dequantised cache folder> --method fast` uses the shipped heads
    and gives the alias's own text."""
    folder = models.cache_root() / "models" / models.DEFAULT_MODEL
    args = ["generate", "--method", "fast", "--prompt", "Name three rivers.", "--max-new-tokens", "24", "--json"]
    assert main(args) == 0
    by_alias = json.loads(capsys.readouterr().out)
    assert main(args + ["--model", str(folder)]) == 0
    by_folder = json.loads(capsys.readouterr().out)
    assert by_folder["text"] == by_alias["text"] and by_folder["heads"] == by_alias["heads"] is not None
    assert by_alias["model"] == "smollm2-135m (Q4_1 GGUF, dequantised)"


def test_auto_dtype_is_bfloat16_only_where_the_cpu_has_native_bfloat16(monkeypatch, tmp_path):
    from blockdraft import cpu
    from blockdraft.models import parse_dtype

    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(cpu, "fast_bfloat16", lambda native=native: native)
        assert parse_dtype("auto") == parse_dtype("auto", torch.device("cpu")) == expected
    assert parse_dtype("float32") == torch.float32 and parse_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(BlockdraftError, match="auto, float32"):
        parse_dtype("int3")
    tiny_llama(3, dtype=torch.float32).save_pretrained(tmp_path / "m")
    tiny_tokenizer(64).save_pretrained(tmp_path / "m")
    monkeypatch.setattr(cpu, "fast_bfloat16", lambda: True)
    assert load_model(str(tmp_path / "m"), "auto").model.dtype == torch.bfloat16


def test_loading_in_another_dtype_casts_the_weights_as_transformers_does(tmp_path):
    """load_model casts weight by weight (to keep the peak low); the result is transformers' own
    from_pretrained(dtype=...): same tensors, same dtypes, buffers left alone, ties kept."""
    from transformers import AutoModelForCausalLM

    tiny_llama(3, dtype=torch.float32).save_pretrained(tmp_path / "m")
    tiny_tokenizer(64).save_pretrained(tmp_path / "m")
    for dtype in (torch.bfloat16, torch.float16):
        ours = load_model(str(tmp_path / "m"), str(dtype).removeprefix("torch.")).model
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=dtype)
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
        assert {n: t.dtype for n, t in ours.named_buffers()} == {n: t.dtype for n, t in theirs.named_buffers()}
        assert ours.config.dtype == dtype
