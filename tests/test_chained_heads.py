"""Chained (Hydra-style) draft heads: drafting equals teacher forcing on the drafted chain, output stays greedy."""
import copy
import random

import pytest
import torch

from blockdraft.drafting import HeadsDrafter
from blockdraft.engine import DecodeConfig, generate
from blockdraft.heads import following_ids, load_heads
from blockdraft.refine.base import ArgmaxRefiner
from blockdraft.refine.lattice import PBestRefiner
from blockdraft.target import TargetModel
from blockdraft.testing import random_heads, reference_greedy


def _prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(64) for _ in range(9)]


@pytest.mark.parametrize("draft_vocab", [False, True])
def test_sequential_draft_equals_teacher_forcing_on_its_own_chain(tiny_models, draft_vocab):
    model = tiny_models(0, torch.float64)
    heads = random_heads(model, 4, seed=3, chain=True)
    if draft_vocab:
        heads.set_draft_vocab(torch.arange(0, 64, 2))  # even ids only
    lm_head = model.get_output_embeddings()
    hidden = torch.randn(model.config.hidden_size, dtype=torch.float64)
    logits, vocab = heads.draft_logits(hidden, lm_head, next_token=5)
    chain = [5] + [int(t if vocab is None else vocab[t]) for t in logits.argmax(-1)]
    forced = heads.logits(hidden[None], lm_head, torch.tensor([chain[:4]]))[0]  # [K, V]
    if vocab is not None:
        forced = forced[:, vocab]
        assert all(t % 2 == 0 for t in chain[1:])
    torch.testing.assert_close(logits, forced)
    fewer, _ = heads.draft_logits(hidden, lm_head, next_token=5, num_heads=2)
    torch.testing.assert_close(fewer, logits[:2])


def test_chained_heads_need_the_next_token(tiny_models):
    model = tiny_models(0, torch.float64)
    heads = random_heads(model, 2, chain=True)
    with pytest.raises(ValueError, match="next token"):
        heads.draft_logits(torch.zeros(model.config.hidden_size, dtype=torch.float64), model.get_output_embeddings())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_heads,topk,refiner", [(1, 1, "argmax"), (3, 1, "argmax"), (6, 1, "argmax"), (4, 4, "pbest")])
def test_chained_heads_match_greedy(tiny_models, dtype, seed, num_heads, topk, refiner):
    model = tiny_models(seed, dtype)
    prompt = _prompt(seed)
    drafter = HeadsDrafter(random_heads(model, num_heads, seed, chain=True), model.get_output_embeddings(), topk=topk)
    chosen = ArgmaxRefiner() if refiner == "argmax" else PBestRefiner(None, alpha=0.0, p=3)
    got = generate(TargetModel(model), drafter, chosen, prompt, DecodeConfig(max_new_tokens=23))
    assert got.ids == reference_greedy(model, prompt, 23)


def test_chained_config_survives_save_and_load(tiny_models, tmp_path):
    model = tiny_models(0, torch.float32)
    heads = random_heads(model, 3, chain=True).float()
    heads.save(tmp_path / "h", dtype=torch.float32)
    again = load_heads(tmp_path / "h")
    assert again.config.chain and [b.in_features for b in again.blocks] == [2 * 32, 3 * 32, 4 * 32]
    hidden, before = torch.randn(2, 32), torch.tensor([[1, 2, 3], [4, 5, 6]])
    lm_head = model.get_output_embeddings()
    torch.testing.assert_close(again.logits(hidden, lm_head, before), heads.logits(hidden, lm_head, before))


def test_following_ids_pad_past_the_end():
    assert following_ids([7, 8, 9], 0, 3, 2).tolist() == [[8, 9], [9, 0], [0, 0]]


def test_init_from_plain_heads_starts_chained_heads_where_they_were(tiny_models, tmp_path):
    from blockdraft.heads import DraftHeads, HeadsConfig
    from blockdraft.train.heads import init_from

    model = tiny_models(0, torch.float32)
    plain = random_heads(model, 3, seed=2).float()
    plain.save(tmp_path / "plain", dtype=torch.float32)
    chained = DraftHeads(HeadsConfig(num_heads=3, hidden_size=32, vocab_size=64, chain=True))
    init_from(chained, str(tmp_path / "plain"), model, fingerprint="")
    hidden, before = torch.randn(5, 32), torch.randint(0, 64, (5, 3))
    lm_head = model.get_output_embeddings()
    torch.testing.assert_close(chained.logits(hidden, lm_head, before), plain.logits(hidden, lm_head))


@pytest.mark.parametrize("heads_dtype", [torch.float32, torch.bfloat16])
def test_packed_drafting_equals_the_modules_and_follows_weight_changes(tiny_models, heads_dtype):
    """On a oneDNN target the chained blocks and draft rows run packed for one-row products:
    the plain modules' logits (up to summation order); switching the head's layout or changing a
    block weight packs again."""
    from blockdraft.cpu import OneDNNLinear, can_pack, can_pack_dtype, use_onednn_linears

    model = copy.deepcopy(tiny_models(1, torch.float32))  # the swap below must not touch the shared model
    if not can_pack(model.get_output_embeddings().weight):
        pytest.skip("oneDNN is not available")
    packs = can_pack_dtype(heads_dtype)  # bfloat16 layouts need native bfloat16 on the CPU
    heads = random_heads(model, 3, seed=2, chain=True).to(heads_dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if heads_dtype == torch.float32 else {"rtol": 0.02, "atol": 0.02}
    heads.set_draft_vocab(torch.arange(0, 64, 3))
    plain_head = model.get_output_embeddings()
    hidden = torch.randn(model.config.hidden_size)
    want, _ = heads.draft_logits(hidden, plain_head, next_token=7)
    assert not heads.draft_rows.rows.is_mkldnn
    use_onednn_linears(model)
    packed_head = model.get_output_embeddings()
    assert isinstance(packed_head, OneDNNLinear)
    got, _ = heads.draft_logits(hidden, packed_head, next_token=7)
    assert heads.draft_rows.rows.is_mkldnn == packs and (not packs or heads.draft_block0.is_mkldnn)
    torch.testing.assert_close(got, want, **tol)
    with torch.no_grad():
        heads.blocks[0].weight.mul_(2)
    again, _ = heads.draft_logits(hidden, packed_head, next_token=7)
    expected, _ = heads.draft_logits(hidden, plain_head, next_token=7)
    assert not heads.draft_rows.rows.is_mkldnn  # back on the plain head: dense rows again
    torch.testing.assert_close(again, expected, **tol)
    assert not torch.allclose(again, got, **tol)
