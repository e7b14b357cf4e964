"""Bad inputs give one-line BlockdraftErrors (tiny models; no real model needed)."""
import json

import pytest
import torch

from blockdraft.errors import BlockdraftError
from blockdraft.heads import DraftHeads, HeadsConfig, load_heads
from blockdraft.models import model_fingerprint
from blockdraft.testing import random_heads, tiny_decoder, tiny_llama


def test_heads_round_trip_and_mismatch(tmp_path):
    model = tiny_llama(0)
    heads = random_heads(model, 3)
    heads.config.base_fingerprint = model_fingerprint(model)
    heads.save(tmp_path / "h", dtype=torch.float64)
    back = load_heads(tmp_path / "h", dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(heads.state_dict().values(), back.state_dict().values()))
    back.check_compatible(model, model_fingerprint(model))
    with pytest.raises(BlockdraftError, match="hidden size"):
        back.check_compatible(tiny_llama(0, hidden=48))
    with pytest.raises(BlockdraftError, match="trained for"):
        back.check_compatible(tiny_llama(1), model_fingerprint(tiny_llama(1)))


def test_corrupt_and_missing_heads(tmp_path):
    with pytest.raises(BlockdraftError, match="no draft heads"):
        load_heads(tmp_path)
    DraftHeads(HeadsConfig(2, 32, 64)).save(tmp_path / "h")
    (tmp_path / "h" / "heads.safetensors").write_bytes(b"garbage")
    with pytest.raises(BlockdraftError, match="corrupt"):
        load_heads(tmp_path / "h")
    DraftHeads(HeadsConfig(2, 32, 64)).save(tmp_path / "g")
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    cfg["num_heads"] = 5
    (tmp_path / "g" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BlockdraftError, match="corrupt"):
        load_heads(tmp_path / "g")


def test_generate_bad_requests():
    dec = tiny_decoder()
    with pytest.raises(BlockdraftError, match="empty prompt"):
        dec.generate("   ", method="ar")
    with pytest.raises(BlockdraftError, match="max_new_tokens"):
        dec.generate(ids=[1, 2], method="ar", max_new_tokens=0)
    with pytest.raises(BlockdraftError, match="context"):
        dec.generate(ids=[3] * 300, method="ar")
    with pytest.raises(BlockdraftError, match="unknown method"):
        dec.generate(ids=[1, 2], method="nope")
    for bad, why in [(dict(temperature=-0.1), "temperature"), (dict(temperature="warm"), "temperature"),
                     (dict(top_p=0.0), "top-p"), (dict(top_k=1.5), "top-k"), (dict(seed=2 ** 64), "seed"),
                     (dict(stop=""), "empty"), (dict(stop=["ok", 3]), "stop")]:
        with pytest.raises(BlockdraftError, match=why):
            dec.generate(ids=[1, 2], method="ar", **bad)
    dec.heads = None
    with pytest.raises(BlockdraftError, match="no draft heads"):
        dec.generate(ids=[1, 2], method="bpd")


def test_a_plain_stop_string_is_one_stop_string():
    dec = tiny_decoder()
    full = dec.generate(ids=[1, 2, 3], method="ar", max_new_tokens=16)
    stop = full.text.split()[2]
    as_string = dec.generate(ids=[1, 2, 3], method="ar", max_new_tokens=16, stop=stop)
    assert as_string.stop_reason == "stop_string" and stop not in as_string.text
    assert as_string.text == dec.generate(ids=[1, 2, 3], method="ar", max_new_tokens=16, stop=[stop]).text


def test_unknown_model_is_one_line(tmp_path):
    from blockdraft.models import load_model

    with pytest.raises(BlockdraftError, match="cannot load model"):
        load_model(str(tmp_path / "nothing"))
