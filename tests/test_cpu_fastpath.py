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


def test_shared_projections_keep_one_copy_and_the_same_logits():
    """blockdraft.load packs a Llama model's projections once, fused as the fast path runs them:
    the fast path, transformers' own forward and a restore all see exactly the same weights."""
    from blockdraft.cpu import PackedRows
    from blockdraft.fastpath import share_projections
    from blockdraft.target import TargetModel
    from blockdraft.tree import build_tree

    model = tiny_llama(3, torch.float32)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, 64, (1, 11))
    want = model(input_ids=x).logits
    plain = TargetModel(model)
    plain.prefill(x[0].tolist())
    tree = build_tree(5, [[7, 9], [8]])
    want_tree = plain.forward(tree)[0]
    assert share_projections(model) == 7 * len(model.model.layers)
    assert not any(type(m) is torch.nn.Linear for m in model.model.layers.modules())
    rows = [m for m in model.modules() if isinstance(m, PackedRows)]
    assert rows and all(m.own is None for m in rows)  # no second copy until transformers' own forward runs
    shared = TargetModel(model)
    shared.prefill(x[0].tolist())
    used = [layer[1].packed for layer in shared.runner.layers]  # the fast path's q|k|v products
    assert all(packed is layer.self_attn.q_proj.fused for packed, layer in zip(used, model.model.layers))
    got_tree = shared.forward(tree)[0]
    torch.testing.assert_close(got_tree, want_tree, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(input_ids=x).logits, want, rtol=1e-4, atol=1e-4)
    restore_linears(model)
    for name, param in model.named_parameters():
        assert torch.equal(param, dense[name]), name


def test_released_pages_of_a_mapped_file_read_back_its_bytes(tmp_path):
    """release_pages drops resident pages only: a file-backed tensor still reads the file's values."""
    import numpy as np

    from blockdraft.cpu import release_pages

    path = tmp_path / "weights.f32"
    values = np.arange(300_000, dtype=np.float32)
    values.tofile(path)
    mapped = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))
    assert float(mapped.sum()) == float(values.sum())  # every page read once: resident
    release_pages(mapped)
    assert torch.equal(mapped, torch.from_numpy(values))


def test_releasing_one_view_of_a_shared_storage_keeps_the_others_data():
    """Only the tensor's own bytes go: weights that share one storage (as a checkpoint loaded
    into one buffer may) keep theirs, even in anonymous memory, which reads back as zeros."""
    from blockdraft.cpu import release_pages

    whole = torch.arange(400_000, dtype=torch.float32)
    first, rest = whole[:200_000], whole[200_000:]
    expected = rest.clone()
    release_pages(first)
    assert torch.equal(rest, expected)


def test_a_packed_only_linear_unpacks_its_exact_weight():
    from blockdraft.cpu import can_pack

    linear = torch.nn.Linear(32, 48, bias=True)
    if not can_pack(linear.weight):
        import pytest
        pytest.skip("no oneDNN here")
    swapped = OneDNNLinear(linear, keep_dense=False)
    assert swapped.dense is None
    assert torch.equal(swapped.weight, linear.weight.detach())
    back = swapped.to_linear()
    x = torch.randn(3, 32)
    assert torch.equal(back.weight, linear.weight) and torch.equal(back(x), linear(x))
