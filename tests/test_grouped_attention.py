"""blockdraft.load runs masked SDPA attention on the grouped key/value heads: same logits as
transformers' own SDPA path, set on the loaded model only (no environment variable), undone by release."""
import os

import torch

import blockdraft
from blockdraft.cpu import GROUPED_KV_SDPA, attend_with_grouped_kv, restore_attention
from blockdraft.testing import tiny_llama, tiny_tokenizer


def test_same_logits_as_transformers_sdpa_with_a_mask():
    model = tiny_llama(5, dtype=torch.float64)  # 4 query heads on 2 key/value heads
    ids = torch.tensor([[3, 9, 4, 17, 22, 5, 8, 30], [1, 2, 6, 11, 40, 13, 7, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])  # padding: a real mask
    with torch.inference_mode():
        reference = model(input_ids=ids, attention_mask=mask).logits
        previous = attend_with_grouped_kv(model)
        assert previous == "sdpa" and model.config._attn_implementation == GROUPED_KV_SDPA
        grouped = model(input_ids=ids, attention_mask=mask).logits
        unmasked = model(input_ids=ids[1:]).logits
        restore_attention(model, previous)
        assert model.config._attn_implementation == "sdpa"
        assert torch.allclose(unmasked, model(input_ids=ids[1:]).logits, atol=1e-12, rtol=0)
    assert torch.allclose(grouped[:, 2:], reference[:, 2:], atol=1e-12, rtol=0)


def test_load_sets_it_on_its_own_model_only(tmp_path):
    tiny_llama(4, dtype=torch.float32).save_pretrained(tmp_path / "m")
    tiny_tokenizer(64).save_pretrained(tmp_path / "m")
    before = dict(os.environ)
    dec = blockdraft.load(str(tmp_path / "m"))
    assert dict(os.environ) == before
    assert dec.loaded.model.config._attn_implementation == GROUPED_KV_SDPA
    other = tiny_llama(4, dtype=torch.float32)
    assert other.config._attn_implementation == "sdpa"
    dec.release()
    assert dec.loaded.model.config._attn_implementation == "sdpa"
