"""The oneDNN linear swap keeps float32 results and the losslessness contract."""
import torch

from blockdraft.bench.runner import added_memory
from blockdraft.cpu import OneDNNLinear, restore_linears, use_onednn_linears
from blockdraft.testing import reference_greedy, tiny_decoder, tiny_llama


def test_swap_matches_dense_and_restores():
    model = tiny_llama(0, torch.float32)
    x = torch.randint(0, 64, (1, 9))
    want = model(input_ids=x).logits
    assert use_onednn_linears(model) > 0
    assert any(isinstance(m, OneDNNLinear) for m in model.modules())
    torch.testing.assert_close(model(input_ids=x).logits, want, rtol=1e-4, atol=1e-4)
    restore_linears(model)
    assert not any(isinstance(m, OneDNNLinear) for m in model.modules())


def test_bpd_is_lossless_on_the_fast_path_and_memory_is_counted():
    dec = tiny_decoder(seed=2)
    dec.loaded.model.float()
    dec.heads.float()
    use_onednn_linears(dec.loaded.model)
    prompt = [5, 9, 13, 7, 22]
    for method in ("ar", "bpd", "bpd-0gram-p3"):
        got = dec.generate(ids=prompt, method=method, max_new_tokens=20)
        assert got.ids == reference_greedy(dec.loaded.model, prompt, 20, stop_ids=dec.stop_ids())
    mem = added_memory(dec, "bpd", peak_tree_nodes=4)
    heads_mb = sum(p.numel() * p.element_size() for p in dec.heads.parameters()) / 2**20
    assert abs(mem["weights_mb"] - heads_mb) < 1e-9
