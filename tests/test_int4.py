"""4-bit weights (blockdraft.int4, `--dtype int4`): what the codes stand for, and drafted
decoding that stays exact because each row's product is the same whatever the row count."""
import json

import pytest
import torch

from blockdraft import int4
from blockdraft.drafting import HeadsDrafter, NoDrafter
from blockdraft.engine import DecodeConfig, generate
from blockdraft.fastpath import projection_kind, share_projections
from blockdraft.int4 import GROUP, Int4Linear, Int4Weight
from blockdraft.lookup import ContextLookup
from blockdraft.refine.base import ArgmaxRefiner
from blockdraft.refine.lattice import PBestRefiner
from blockdraft.target import TargetModel
from blockdraft.testing import random_heads, tiny_llama
from blockdraft.tree import build_tree

pytestmark = pytest.mark.skipif(not int4.available(), reason="this torch has no CPU 4-bit kernels")


def _four_bit(out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight whose groups are already 16 levels apart (as a Q4_1 GGUF's are) and its codes."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_features, in_features // GROUP, GROUP), generator=g)
    codes[..., 0], codes[..., 1] = 0, 15  # every group spans its 16 levels
    step = torch.rand(out_features, in_features // GROUP, 1, generator=g) * 0.01 + 0.001
    low = -torch.rand(out_features, in_features // GROUP, 1, generator=g) * 0.1
    return (codes * step + low).reshape(out_features, in_features), codes.reshape(out_features, in_features)


def test_a_four_bit_weight_comes_back_as_its_levels():
    weight, _ = _four_bit(96, 128)
    got = Int4Weight.quantize(weight).dequantize().float()
    # the step, the offset and the value read back are rounded to bfloat16 (8 significant bits)
    groups = weight.reshape(96, -1, GROUP)
    span, size = groups.amax(-1) - groups.amin(-1), groups.abs().amax(-1)
    err = (got - weight).abs().reshape(96, -1, GROUP).amax(-1)
    assert (err <= (span + size) * 2 ** -7).all()
    wrong_level = (got - weight).abs().reshape(96, -1, GROUP) > (span / 15 / 2)[..., None]
    assert not wrong_level.any()  # no value lands on a neighbouring level


def test_each_rows_product_is_the_same_whatever_the_row_count():
    g = torch.Generator().manual_seed(1)
    weight = Int4Weight.quantize(torch.randn(960, 576, generator=g) * 0.05)
    x = torch.randn(1, 130, 576, generator=g).bfloat16()
    alone = torch.cat([weight(x[:, i: i + 1]) for i in range(130)], 1)
    for rows in (2, 5, 17, 33, 64, 130):
        assert torch.equal(weight(x[:, :rows]), alone[:, :rows]), rows


def test_rows_of_a_fused_weight_are_its_product_sliced():
    g = torch.Generator().manual_seed(2)
    fused = Int4Weight.quantize(torch.randn(160, 64, generator=g))
    q, kv = Int4Linear(fused, 0, 96), Int4Linear(fused, 96, 160)
    x = torch.randn(3, 64, generator=g).bfloat16()
    assert torch.equal(torch.cat([q(x), kv(x)], -1), fused(x))
    assert q.out_features == 96 and kv.weight.shape == (64, 64)
    assert torch.equal(kv.weight, fused.dequantize()[96:])
    plain = kv.to_linear()
    assert isinstance(plain, torch.nn.Linear) and torch.equal(plain.weight, kv.weight)


def test_rows_in_whole_blocks_multiply_alone_over_the_shared_codes():
    """transformers' forward calls q, k and v (gate and up) one by one: rows in whole blocks of 64
    run the kernel on their slice of the fused codes (no copy) and give the fused product's rows;
    other rows fall back to slicing the fused product."""
    g = torch.Generator().manual_seed(3)
    fused = Int4Weight.quantize(torch.randn(320, 128, generator=g))
    q, k, v = Int4Linear(fused, 0, 192), Int4Linear(fused, 192, 256), Int4Linear(fused, 256, 320)
    assert all(part.own is not None and part.own.packed.data_ptr() >= fused.packed.data_ptr() for part in (q, k, v))
    for rows in (1, 5, 70):  # the kernel, and from 64 rows the dense product
        x = torch.randn(1, rows, 128, generator=g).bfloat16()
        assert torch.equal(torch.cat([q(x), k(x), v(x)], -1), fused.prefill(x))
    assert Int4Linear(fused, 0, 96).own is None and Int4Linear(fused).own is None


def test_weights_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        Int4Weight.quantize(torch.randn(8, 40))
    with pytest.raises(ValueError, match="bfloat16"):
        share_projections(tiny_llama(0, torch.float32), int4=True)


def _int4_llama(seed: int):
    model = tiny_llama(seed, torch.bfloat16, hidden=64)
    assert share_projections(model, int4=True) == 7 * len(model.get_decoder().layers)
    assert isinstance(model.get_decoder().layers[0].self_attn.k_proj, Int4Linear)
    return model


def test_a_tokens_logits_do_not_depend_on_the_tree_size():
    target = TargetModel(_int4_llama(5))
    prompt = [(7 * i + 3) % 64 for i in range(40)]
    target.prefill(prompt[:-1])
    alone = target.forward(build_tree(prompt[-1], []))[0][0]
    target.rollback(1)
    for n in (2, 5, 17, 31, 70):
        tree = build_tree(prompt[-1], [[(5 * j + 1) % 64 for j in range(n - 1)], [9, 9]])
        got = target.forward(tree)[0][0]
        target.rollback(tree.size)
        assert torch.equal(got, alone), n


def test_the_fast_path_computes_what_the_models_own_forward_does():
    """The fast path and transformers' forward run the same 4-bit products (fused, or sliced from
    the fused one); their bfloat16 attention kernels differ in the last bits."""
    model = _int4_llama(3)
    prompt = [(3 * i + 1) % 64 for i in range(20)]
    logits = []
    for target in (TargetModel(model), TargetModel(model, fast_path=False)):
        target.prefill(prompt[:-1])
        logits.append(target.forward(build_tree(prompt[-1], [[3, 4, 5]]))[0].float())
    assert (logits[0] - logits[1]).abs().max() <= 0.02 * logits[1].abs().max()


@pytest.mark.parametrize("seed", range(6))
def test_drafted_decoding_equals_plain_decoding_through_the_engine(seed):
    model = _int4_llama(seed)
    prompt = [(seed * 5 + 3 * i) % 64 for i in range(12)]
    ref = generate(TargetModel(model), NoDrafter(), ArgmaxRefiner(), prompt, DecodeConfig(max_new_tokens=40))
    heads = random_heads(model, 4, seed).bfloat16()
    chain = generate(TargetModel(model), HeadsDrafter(heads, model.get_output_embeddings(), topk=1), ArgmaxRefiner(),
                     prompt, DecodeConfig(max_new_tokens=40))
    tree = generate(TargetModel(model), HeadsDrafter(heads, model.get_output_embeddings(), topk=6),
                    ContextLookup(PBestRefiner(None, 0.0, 12)), prompt, DecodeConfig(max_new_tokens=40))
    assert chain.ids == ref.ids and tree.ids == ref.ids
    assert max(s.tree_nodes for s in tree.stats) > 20  # trees, not chains


def test_generate_with_int4_from_the_command_line(model_dir, capsys):
    from blockdraft.cli import main

    assert main(["generate", "--model", str(model_dir), "--dtype", "int4", "--method", "ar", "--raw", "--json",
                 "--max-new-tokens", "5", "--prompt", "hello"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["dtype"] == "int4" and out["new_tokens"] == 5


def test_int4_is_for_decoding_commands_only(tmp_path, capsys):
    from blockdraft.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "turns": ["hi"]}) + "\n")
    code = main(["distill", "--dtype", "int4", "--prompts", str(prompts), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "for decoding" in err
    assert not (tmp_path / "o").exists()


def test_release_gives_plain_layers_back(model_dir):
    import blockdraft

    dec = blockdraft.load(str(model_dir), heads=None, dtype="int4")
    assert dec.loaded.dtype_name == "int4"
    before = dec.generate(ids=[1, 2, 3, 4], method="ar", max_new_tokens=6).ids
    dec.release()
    assert not any(isinstance(m, Int4Linear) for m in dec.loaded.model.modules())
    assert len(before) == 6


def test_decoded_weights_are_the_kernels_own_values():
    g = torch.Generator().manual_seed(4)
    for shape in ((960, 576), (576, 1536), (128, 64)):
        weight = Int4Weight.quantize(torch.randn(*shape, generator=g))
        eye = torch.eye(shape[1], dtype=torch.bfloat16)
        assert torch.equal(weight.dequantize(), weight(eye).t()), shape


def test_a_long_prefill_takes_the_dense_product_and_drafted_rows_stay_exact():
    """Prefill rows need not each be exact (every method shares them); drafted calls of 64-70
    rows are split into products of at most 64 rows, each through the kernel."""
    from blockdraft.fastpath import _Linear

    g = torch.Generator().manual_seed(5)
    weight = Int4Weight.quantize(torch.randn(96, 64, generator=g))
    linear = _Linear(None, int4=weight)
    x = torch.randn(1, 70, 64, generator=g).bfloat16()
    assert torch.equal(linear(x), weight.dense(x))  # a prefill
    alone = torch.cat([weight(x[:, i: i + 1]) for i in range(70)], 1)
    assert torch.equal(linear(x, 64), alone)
    assert torch.equal(linear(x[:, :64], 64), alone[:, :64])


def test_auto_keeps_four_bit_codes_only_for_a_four_bit_gguf(model_dir):
    """`--dtype auto` decodes a known 4-bit GGUF's weights in int4, any other model in bfloat16."""
    import dataclasses

    from blockdraft.models import LoadedModel, auto_weights

    model = tiny_llama(0, torch.bfloat16)
    loaded = LoadedModel(model, None, "smollm2-135m", alias="smollm2-135m")
    assert auto_weights(loaded) == "int4"
    assert auto_weights(dataclasses.replace(loaded, alias=None)) is None
    assert auto_weights(LoadedModel(tiny_llama(0, torch.float32), None, "x", alias="smollm2-135m")) is None


def test_the_cost_curve_key_names_the_projection_kernel():
    """A cost curve measured with one kernel must not size the trees of another."""
    assert projection_kind(_int4_llama(0)) == "Int4Weight"
    assert projection_kind(tiny_llama(0, torch.bfloat16)) == "Linear"
