"""blockdraft.fastpath computes what transformers' LlamaModel computes, step by step."""
import pytest
import torch

from blockdraft.cpu import OneDNNLinear, use_onednn_linears
from blockdraft.drafting import HeadsDrafter
from blockdraft.engine import DecodeConfig, generate
from blockdraft.exact_attention import cache_dtype, padded_keys
from blockdraft.fastpath import LlamaFastPath, unsupported
from blockdraft.refine.base import ArgmaxRefiner
from blockdraft.rope import RopeTable
from blockdraft.target import TREE_SLACK, TargetModel
from blockdraft.testing import random_heads, reference_greedy, tiny_llama, transformers_reads_rope_table
from blockdraft.tree import TokenTree, build_tree


# tiny bfloat16 models whose fast path keeps its cache in bfloat16 (64-wide heads, 2 per key head)
# and in float32 (SmolLM2's 64-wide heads, 3 per key head) where this CPU's float32 products allow
CACHES = {"bfloat16": (dict(hidden=128, heads=(2, 1)), (64, 2, 1)), "float32": (dict(hidden=192, heads=(3, 1)), (64, 3, 1))}


def _cached_in(cache: str) -> dict:
    """The tiny model's shape for a cache dtype; skips it where this CPU picks the other dtype."""
    shape, heads = CACHES[cache]
    if cache_dtype(*heads) != getattr(torch, cache):
        pytest.skip(f"this CPU keeps {cache_dtype(*heads)} caches for {heads} heads")
    return shape


def _cache_dtypes() -> list[torch.dtype]:
    """The cache dtypes exact attention runs in on this CPU (float32 where row-exact)."""
    return sorted({torch.bfloat16, cache_dtype(64, 3, 3)}, key=str)


def _steps(target: TargetModel, prompt: list[int]) -> list[torch.Tensor]:
    """Logits of a fixed script: prefill, a chain, a tree, a side-branch commit, a crop, a chain."""
    target.prefill(prompt[:-1])
    out = []
    chain = build_tree(prompt[-1], [[3, 4, 5]])
    out.append(target.forward(chain)[0])
    target.commit(chain, [0, 1])
    tree = build_tree(4, [[7, 8, 9], [7, 10], [11, 12, 13, 14]])
    out.append(target.forward(tree)[0])
    target.commit(tree, [0, 5, 6])  # the second branch, not a prefix of the fed tokens
    out.append(target.forward(build_tree(10, [[1, 2]]))[0])
    target.rollback(2)
    out.append(target.forward(build_tree(2, [[60, 61, 62, 63]]))[0])
    assert target.cache_length == len(prompt) - 1 + 2 + 3 + 1 + 5
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("onednn", [False, True])
def test_logits_equal_transformers(dtype, seed, onednn):
    """Bit for bit where both paths run the same kernels (float64; float32 with the oneDNN swap
    that `blockdraft.load` makes) once transformers reads the fast path's rotary tables; within
    float32 rounding where transformers runs MKL's dense products and the fast path oneDNN's,
    and within the tables' last bit with transformers' own rotary embedding."""
    model = tiny_llama(seed, dtype)
    if onednn:
        use_onednn_linears(model)  # float32 only: the packed layout both paths share
    fast, slow = TargetModel(model), TargetModel(model, fast_path=False)
    assert (fast.path, slow.path) == ("llama-fastpath", "transformers")
    prompt = [5, 9, 13, 7, 22, 40, 41]
    own = _steps(slow, prompt)  # transformers' own rotary embedding
    transformers_reads_rope_table(model)
    for got, want, near in zip(_steps(fast, prompt), _steps(slow, prompt), own):
        torch.testing.assert_close(got, near, rtol=1e-5, atol=1e-5)
        if dtype == torch.float32 and not onednn:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(got, want)


def test_rope_rows_do_not_depend_on_the_call():
    """A position's cos and sin are the same bits whatever else a call asks for, and close to
    transformers' own."""
    model = tiny_llama(0, torch.float32, max_positions=2048)
    rotary = model.model.rotary_emb
    table = RopeTable(rotary)
    alone = [table(torch.tensor([p]), torch.float32) for p in (0, 1, 5, 700, 1500)]
    together = table(torch.tensor([1500, 5, 0, 700, 1]), torch.float32)
    for got, p in zip(alone, (0, 1, 5, 700, 1500)):
        index = [1500, 5, 0, 700, 1].index(p)
        assert torch.equal(got[0][..., 0, :], together[0][..., index, :])
        assert torch.equal(got[1][..., 0, :], together[1][..., index, :])
    x = torch.zeros(1, 1, 8)
    cos, sin = rotary(x, torch.arange(1600)[None])
    mine = table(torch.arange(1600), torch.float32)
    torch.testing.assert_close(mine[0][0, 0], cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mine[1][0, 0], sin[0], rtol=0, atol=1e-6)


def test_cache_grows_past_its_first_capacity():
    model = tiny_llama(1, torch.float64, max_positions=256)
    target = TargetModel(model, cache_capacity=4)
    prompt = list(range(3, 12))
    target.prefill(prompt[:-1])  # no reservation: the cache doubles as it fills
    assert target.runner.capacity == 8 and target.runner.keys.shape[2] == 8
    drafter = HeadsDrafter(random_heads(model, 3, 1), model.get_output_embeddings())
    got = generate(target, drafter, ArgmaxRefiner(), prompt, DecodeConfig(max_new_tokens=40))
    assert got.ids == reference_greedy(model, prompt, 40)
    # the engine sizes the cache for the whole request once: prompt + budget + a tree's slack, in
    # whole key blocks (bfloat16 attention reads a padded span of it as a view)
    assert target.runner.capacity == padded_keys(len(prompt) + 40 + TREE_SLACK) == target.runner.keys.shape[2]


def test_weights_changed_after_construction_are_picked_up():
    """The fused copies are rebuilt when the model's weights change (a cast, a swap, an edit)."""
    model = tiny_llama(2, torch.float64)
    target = TargetModel(model)
    prompt = [1, 2, 3, 4]
    target.prefill(prompt)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(-1)
    model.float()
    use_onednn_linears(model)
    assert any(isinstance(m, OneDNNLinear) for m in model.modules())
    got = generate(target, HeadsDrafter(random_heads(model, 2, 2).float(), model.get_output_embeddings()),
                   ArgmaxRefiner(), prompt, DecodeConfig(max_new_tokens=20))
    assert got.ids == reference_greedy(model, prompt, 20)


def test_other_architectures_take_the_transformers_path():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attention_bias=True)
    model = LlamaForCausalLM(cfg).eval()
    assert unsupported(model) == "projections with biases"
    assert TargetModel(model).path == "transformers"
    assert unsupported(tiny_llama(0)) is None and isinstance(TargetModel(tiny_llama(0)).runner, LlamaFastPath)


@pytest.mark.parametrize("dtype,cache", [(torch.float32, "bfloat16"), (torch.bfloat16, "bfloat16"),
                                         (torch.bfloat16, "float32"), (torch.float64, "bfloat16")])
def test_a_tokens_logits_do_not_depend_on_the_tree_size(dtype, cache):
    """The property that keeps drafted decoding equal to plain decoding at every dtype: the
    pending token's logits are the same whether it is fed alone or with 1-30 draft nodes
    (bit for bit in bfloat16, whose attention is row-exact with either cache dtype; float32's
    and float64's fused attention differs in the last bits, far below a bfloat16 logit's
    resolution)."""
    model = tiny_llama(5, dtype, **_cached_in(cache))
    target = TargetModel(model)
    prompt = [(7 * i + 3) % 64 for i in range(40)]
    target.prefill(prompt[:-1])
    alone = target.forward(build_tree(prompt[-1], []))[0][0]
    target.rollback(1)
    for n in (2, 3, 5, 9, 17, 31):
        tree = build_tree(prompt[-1], [[(5 * j + 1) % 64 for j in range(n - 1)], [9, 9]])
        got = target.forward(tree)[0][0]
        target.rollback(tree.size)
        if dtype == torch.bfloat16:
            assert torch.equal(got, alone), n
        else:
            torch.testing.assert_close(got, alone, rtol=0, atol=1e-4 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("seed", range(6))
def test_bfloat16_drafted_decoding_equals_plain_decoding_through_the_engine(seed, cache):
    model = tiny_llama(seed, torch.bfloat16, **_cached_in(cache))
    prompt = [(seed * 5 + 3 * i) % 64 for i in range(12)]
    from blockdraft.drafting import NoDrafter

    plain = TargetModel(model)
    ref = generate(plain, NoDrafter(), ArgmaxRefiner(), prompt, DecodeConfig(max_new_tokens=40))
    assert plain.runner.keys.dtype == getattr(torch, cache)
    got = generate(TargetModel(model), HeadsDrafter(random_heads(model, 4, seed).bfloat16(), model.get_output_embeddings(),
                   topk=1), ArgmaxRefiner(), prompt, DecodeConfig(max_new_tokens=40))
    assert got.ids == ref.ids
    from blockdraft.lookup import ContextLookup
    from blockdraft.refine.lattice import PBestRefiner

    wide = generate(TargetModel(model), HeadsDrafter(random_heads(model, 4, seed).bfloat16(), model.get_output_embeddings(),
                    topk=6), ContextLookup(PBestRefiner(None, 0.0, 12)), prompt, DecodeConfig(max_new_tokens=40))
    assert wide.ids == ref.ids and max(s.tree_nodes for s in wide.stats) > 20  # trees, not chains


@pytest.mark.parametrize("cache", _cache_dtypes(), ids=str)
def test_bfloat16_attention_rows_equal_one_query_alone(cache):
    """Each tree row's bfloat16 attention equals that query decoded alone, bit for bit, over
    many cache lengths and tree sizes (with reductions over the exact key count, 7 of these
    rows differed in the last bit: the sum's tail depended on the padding)."""
    from blockdraft.exact_attention import row_exact_attention

    differing = 0
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        past, n = int(torch.randint(5, 90, (1,), generator=g)), int(torch.randint(2, 24, (1,), generator=g))
        q = torch.randn(1, 9, n, 64, generator=g).bfloat16()
        k, v = (torch.randn(1, 3, past + n, 64, generator=g).bfloat16().to(cache) for _ in range(2))
        tree = row_exact_attention(q, k, v, torch.ones(n, past + n, dtype=torch.bool).tril(past), 0.125)
        for i in range(n):
            alone = row_exact_attention(q[:, :, i:i + 1], k[:, :, :past + i + 1], v[:, :, :past + i + 1], None, 0.125)
            differing += not torch.equal(alone[0, :, 0], tree[0, :, i])
    assert differing == 0


def _random_tree(g: torch.Generator, n: int) -> TokenTree:
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
    depths = [0]
    for node in range(1, n):
        depths.append(depths[parents[node]] + 1)
    return TokenTree([0] * n, parents, depths)


@pytest.mark.parametrize("cache", _cache_dtypes(), ids=str)
def test_bfloat16_attention_over_branching_trees_equals_each_row_alone(cache):
    """Rows of random token trees (a product per root-to-leaf path, the path's nodes written
    right after the cache) equal each node decoded alone after its ancestors, bit for bit; the
    cache view they were handed is left as it was."""
    from blockdraft.exact_attention import path_layout, row_exact_attention

    differing = paths = 0
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        past, n = int(torch.randint(5, 200, (1,), generator=g)), int(torch.randint(2, 33, (1,), generator=g))
        tree = _random_tree(g, n)
        ancestors = tree.ancestor_mask()
        allowed = torch.cat([torch.ones(n, past, dtype=torch.bool), ancestors], 1)
        q = torch.randn(1, 9, n, 64, generator=g).bfloat16()
        size = padded_keys(past + n)  # a cache view: whole key blocks, zeros past the real keys
        k, v = (torch.randn(1, 3, size, 64, generator=g).bfloat16().to(cache) for _ in range(2))
        k[:, :, past + n:], v[:, :, past + n:] = 0, 0
        before = v.clone()
        layout = path_layout(allowed, past + n)
        paths += len(layout.paths)
        got = row_exact_attention(q, k, v, allowed, 0.125, valid=past + n, layout=layout)
        assert torch.equal(v, before)
        for i in range(n):
            chain = past + ancestors[i].nonzero().flatten()
            keys, values = (torch.cat([x[:, :, :past], x[:, :, chain]], 2) for x in (k, v))
            alone = row_exact_attention(q[:, :, i:i + 1], keys, values, None, 0.125)
            differing += not torch.equal(alone[0, :, 0], got[0, :, i])
    assert differing == 0 and paths > 60 * 3  # branching trees, not chains


@pytest.mark.parametrize("cache", _cache_dtypes(), ids=str)
def test_bfloat16_attention_with_other_visibility_copies_each_rows_keys(cache):
    """A mask that is no token tree (a row skipping part of the cache) has no path layout; its
    rows are still computed exactly, from copies of their keys."""
    from blockdraft.exact_attention import path_layout, row_exact_attention

    g = torch.Generator().manual_seed(0)
    past, n = 70, 4
    allowed = torch.cat([torch.ones(n, past, dtype=torch.bool), torch.eye(n, dtype=torch.bool)], 1)
    allowed[2, 10:20] = False
    assert path_layout(allowed, past + n) is None
    q = torch.randn(1, 9, n, 64, generator=g).bfloat16()
    k, v = (torch.randn(1, 3, past + n, 64, generator=g).bfloat16().to(cache) for _ in range(2))
    got = row_exact_attention(q, k, v, allowed, 0.125)
    for row in range(n):  # row 2 reads 61 keys (one key block), the others 71 (two)
        keep = allowed[row].nonzero().flatten()
        alone = row_exact_attention(q[:, :, row:row + 1], k[:, :, keep], v[:, :, keep], None, 0.125)
        assert torch.equal(alone[0, :, 0], got[0, :, row]), row


def test_bfloat16_products_over_many_rows_equal_each_row_alone():
    """A drafted call's projections take at most EXACT_ROWS rows per product: past 32 rows,
    oneDNN's bfloat16 kernels change and a row's result with them (SmolLM2's shapes here)."""
    from blockdraft.cpu import EXACT_ROWS
    from blockdraft.fastpath import _Linear

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(960, 576, generator=g) * 0.05).bfloat16()
    x = torch.randn(1, 70, 576, generator=g).bfloat16()
    alone = torch.cat([torch.nn.functional.linear(x[:, i:i + 1], weight) for i in range(70)], 1)
    assert torch.equal(_Linear(weight)(x, EXACT_ROWS), alone)


@pytest.mark.parametrize("cache", _cache_dtypes(), ids=str)
def test_bfloat16_tree_attention_over_a_long_cache_equals_each_row_alone(cache):
    """Long caches and long paths: each product takes at most rows_per_product rows (more rows
    change oneDNN's kernel at some widths and a row's result with it)."""
    from blockdraft.exact_attention import row_exact_attention

    g = torch.Generator().manual_seed(1)
    past = 6100
    tree = build_tree(0, [list(range(1, 25)), [1, 2, 30, 31], [40, 41]])
    n = tree.size
    ancestors = tree.ancestor_mask()
    allowed = torch.cat([torch.ones(n, past, dtype=torch.bool), ancestors], 1)
    q = torch.randn(1, 9, n, 64, generator=g).bfloat16()
    k, v = (torch.randn(1, 3, padded_keys(past + n), 64, generator=g).bfloat16().to(cache) for _ in range(2))
    got = row_exact_attention(q, k, v, allowed, 0.125, valid=past + n)
    for i in range(n):
        chain = past + ancestors[i].nonzero().flatten()
        keys, values = (torch.cat([x[:, :, :past], x[:, :, chain]], 2) for x in (k, v))
        assert torch.equal(row_exact_attention(q[:, :, i:i + 1], keys, values, None, 0.125)[0, :, 0], got[0, :, i]), i
