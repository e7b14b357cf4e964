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


def test_packed_rows_do_not_depend_on_the_row_count():
    """With pack_weight's layout a row's product is the same alone or among up to PACK_ROWS rows:
    the products of a verified draft are exactly those of one-token decoding."""
    import pytest

    from blockdraft.cpu import PACK_ROWS, pack_weight, packed_linear

    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        pytest.skip("no oneDNN weight reorder in this torch build")
    torch.manual_seed(0)
    for out_features, in_features in ((4096, 576), (96, 32)):
        packed = pack_weight(torch.randn(out_features, in_features))
        x = torch.randn(PACK_ROWS, in_features)
        every = packed_linear(x, packed)
        for rows in range(1, PACK_ROWS + 1):
            assert torch.equal(packed_linear(x[:rows], packed), every[:rows])
