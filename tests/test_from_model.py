"""The caller's own objects: Decoder.from_model on a loaded transformers model (left unchanged),
transformers' streamers, on_text deltas that add up to the text, release()."""
import threading

import pytest
import torch
from transformers import TextIteratorStreamer, TextStreamer

import blockdraft
from blockdraft import Decoder
from blockdraft.cpu import OneDNNLinear
from blockdraft.errors import BlockdraftError
from blockdraft.testing import (
    random_heads,
    reference_greedy,
    tiny_llama,
    tiny_tokenizer,
)

PROMPT = "write a short poem about the sky"


def _snapshot(model):
    """Every module's kind and every tensor's storage, version and value."""
    tensors = {k: (v.data_ptr(), v._version, v.clone()) for k, v in model.state_dict().items()}
    return [(n, type(m)) for n, m in model.named_modules()], tensors, model.training


def _same(a, b) -> bool:
    return a[0] == b[0] and a[2] == b[2] and a[1].keys() == b[1].keys() and all(
        a[1][k][:2] == b[1][k][:2] and torch.equal(a[1][k][2], b[1][k][2]) for k in a[1])


@pytest.fixture()
def model():
    return tiny_llama(5, dtype=torch.float32)  # float32 on the CPU: the oneDNN path is taken


def test_from_model_is_lossless_and_leaves_the_model_unchanged(model):
    tok = tiny_tokenizer(64)
    before = _snapshot(model)
    dec = Decoder.from_model(model, tok, heads=random_heads(model, 3, seed=2).float(), method="bpd-full")
    assert isinstance(dec.target.lm_head, OneDNNLinear)  # a private packed copy, not swapped into the model
    ids = dec.encode(PROMPT)
    ar = dec.generate(ids=ids, method="ar", max_new_tokens=24)
    bpd = dec.generate(ids=ids, max_new_tokens=24)  # the Decoder's method: bpd-full, a draft every step
    assert bpd.ids == ar.ids and bpd.stats[1].drafted == 3 and not any(s.drafted for s in ar.stats)
    assert ar.ids == reference_greedy(model, ids, 24, dec.stop_ids())[: len(ar.ids)]
    assert _same(before, _snapshot(model))
    dec.release()
    assert _same(before, _snapshot(model))
    with pytest.raises(BlockdraftError, match="released"):
        dec.generate(ids=ids, max_new_tokens=4)


def test_from_model_heads_choices(model, tmp_path):
    tok = tiny_tokenizer(64)
    assert Decoder.from_model(model, tok).heads is None  # not a known alias's weights: no shipped heads
    heads = random_heads(model, 2, seed=1).float()
    heads.save(tmp_path / "h", dtype=torch.float32)
    dec = Decoder.from_model(model, tok, heads=str(tmp_path / "h"))
    assert dec.heads_path == str(tmp_path / "h") and dec.heads.num_heads == 2
    with pytest.raises(BlockdraftError, match="hidden size"):
        Decoder.from_model(model, tok, heads=random_heads(tiny_llama(0, hidden=48), 2))
    model.train()
    with pytest.raises(BlockdraftError, match="eval"):
        Decoder.from_model(model, tok)
    with pytest.raises(BlockdraftError, match="causal LM"):
        Decoder.from_model("gpt2", tok)


def test_release_undoes_the_in_place_swap_of_load(tmp_path):
    folder = tmp_path / "m"
    tiny_llama(5, dtype=torch.float32).save_pretrained(folder)
    tiny_tokenizer(64).save_pretrained(folder)
    dec = blockdraft.load(str(folder))
    kinds = lambda: {type(m) for m in dec.loaded.model.modules()}
    assert dec.swapped_linears > 0 and OneDNNLinear in kinds()
    model = dec.loaded.model
    dec.release()
    assert OneDNNLinear not in kinds() and torch.nn.Linear in {type(m) for m in model.modules()}


class _Collect(TextStreamer):
    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.parts = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.parts.append(text)


@pytest.mark.parametrize("method", ["ar", "bpd-full"])
def test_transformers_streamers_get_what_model_generate_gives_them(model, method):
    tok = tiny_tokenizer(64)
    dec = Decoder.from_model(model, tok, heads=random_heads(model, 3, seed=2).float())
    ids = dec.encode(PROMPT)
    ours = _Collect(tok, skip_prompt=True, skip_special_tokens=True)
    result = dec.generate(ids=ids, method=method, max_new_tokens=20, streamer=ours)
    theirs = _Collect(tok, skip_prompt=True, skip_special_tokens=True)
    hf = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, streamer=theirs,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    assert hf[0, len(ids):].tolist() == result.ids
    assert "".join(ours.parts) == "".join(theirs.parts) == result.text


def test_iterator_streamer_from_another_thread(model):
    tok = tiny_tokenizer(64)
    dec = Decoder.from_model(model, tok, heads=random_heads(model, 3, seed=2).float())
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=60)
    done = {}
    worker = threading.Thread(target=lambda: done.update(r=dec.generate(PROMPT, method="bpd-full", max_new_tokens=20,
                                                                        streamer=streamer)))
    worker.start()
    text = "".join(streamer)
    worker.join()
    assert text == done["r"].text and text


@pytest.mark.parametrize("seed", [0, 2, 3, 4])  # seeds whose answers run past 6 words
def test_on_text_deltas_add_up_to_the_text_with_stop_strings(seed):
    """A stop string that begins in one step and ends in a later one: nothing past its start is sent."""
    model = tiny_llama(seed, dtype=torch.float32)
    tok = tiny_tokenizer(64)
    dec = Decoder.from_model(model, tok, heads=random_heads(model, 3, seed=seed).float())
    full = dec.generate(PROMPT, method="ar", max_new_tokens=24).text
    words = full.split()
    assert len(words) > 6
    for stop in (" ".join(words[3:5]), words[4], full[len(full) // 2: len(full) // 2 + 7]):
        for method, stops in (("ar", (stop,)), ("bpd-full", (stop,)), ("ar", (stop, "never appears here"))):
            parts = []
            result = dec.generate(PROMPT, method=method, max_new_tokens=24, stop=stops, on_text=parts.append)
            assert "".join(parts) == result.text == full[: full.find(stop)]
            assert all(parts)
