"""The context-reading feature head: cache consistency, losslessness, checkpoints, training."""
import random

import pytest
import torch

from blockdraft.drafting import FeatureDrafter
from blockdraft.engine import DecodeConfig, generate
from blockdraft.errors import BlockdraftError
from blockdraft.heads import load_heads
from blockdraft.refine.base import ArgmaxRefiner
from blockdraft.target import TargetModel
from blockdraft.testing import random_feature_head, reference_greedy


def test_incremental_features_equal_one_pass(tiny_models):
    """Steps fed through the head's KV cache give the features of one causal pass over all of them."""
    model = tiny_models(0, torch.float64)
    head = random_feature_head(model, 4, seed=1)
    h = model.config.hidden_size
    hidden, embeds = torch.randn(1, 9, h, dtype=torch.float64), torch.randn(1, 9, h, dtype=torch.float64)
    whole, _ = head(hidden, embeds)
    parts, past, start = [], None, 0
    for size in (1, 3, 2, 1, 2):
        out, past = head(hidden[:, start:start + size], embeds[:, start:start + size], start, past)
        parts.append(out)
        start += size
    torch.testing.assert_close(torch.cat(parts, 1), whole)
    assert past[0].shape[2] == 9


def test_draft_does_not_grow_the_committed_cache(tiny_models):
    model = tiny_models(0, torch.float64)
    drafter = FeatureDrafter(random_feature_head(model, 5, seed=3), model.get_output_embeddings())
    lattice = drafter.propose(torch.randn(3, model.config.hidden_size, dtype=torch.float64), [5, 6, 7, 8])
    assert lattice.depth == 5
    assert drafter.length == 3 and drafter.cache[0].shape[2] == 3


def test_first_draft_reads_the_prompt_then_the_committed_positions(tiny_models):
    """With prompt context, the first draft token is the head's guess after one pass over
    [e(prompt tokens)..., h of the committed node] (the training layout)."""
    model = tiny_models(1, torch.float64)
    head = random_feature_head(model, 3, seed=5, prompt_context=True)
    lm_head = model.get_output_embeddings()
    prompt, new, hidden = [3, 9, 27, 17, 51], 40, torch.randn(1, model.config.hidden_size, dtype=torch.float64)
    lattice = FeatureDrafter(head, lm_head).propose(hidden, prompt + [new])
    e = lm_head.weight
    feats, _ = head(torch.cat([e[prompt[:-1]], hidden])[None], e[prompt[1:] + [new]][None])
    assert int(lattice.tokens[0, 0]) == int(lm_head(feats[0, -1]).argmax())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("stop_below", [0.0, 0.05, 0.3])
def test_feature_drafts_stay_greedy(tiny_models, dtype, seed, stop_below):
    model = tiny_models(seed, dtype)
    prompt = [random.Random(seed).randrange(64) for _ in range(7)]
    drafter = FeatureDrafter(random_feature_head(model, 1 + seed % 5, seed, prompt_context=seed % 2 == 1),
                             model.get_output_embeddings(),
                             topk=3, stop_below=stop_below, with_entropy=seed % 2 == 0)
    got = generate(TargetModel(model), drafter, ArgmaxRefiner(), prompt, DecodeConfig(max_new_tokens=23))
    assert got.ids == reference_greedy(model, prompt, 23)


def test_feature_head_checkpoint_round_trip_and_checks(tiny_models, tmp_path):
    model = tiny_models(0, torch.float32)
    head = random_feature_head(model, 3, seed=4).float()
    head.set_draft_vocab(torch.arange(10, 40))
    head.save(tmp_path / "fh", dtype=torch.float32)
    back = load_heads(tmp_path / "fh")
    assert back.config.draft_vocab_size == 30 and back.draft_vocab.tolist() == list(range(10, 40))
    x = torch.randn(1, 4, model.config.hidden_size)
    torch.testing.assert_close(back(x, x)[0], head(x, x)[0])
    back.check_compatible(model)
    other = tiny_models(0, torch.float32)
    back.config.hidden_size = 48
    with pytest.raises(BlockdraftError, match="hidden size 48"):
        back.check_compatible(other)
    (tmp_path / "fh" / "heads.safetensors").write_bytes(b"garbage")
    with pytest.raises(BlockdraftError, match="corrupt .*heads.safetensors: not a complete safetensors file"):
        load_heads(tmp_path / "fh")


def test_parallel_scoring_tools_refuse_a_feature_head_in_one_line(tiny_models):
    from blockdraft.analysis.runner import teacher_forced_topk
    from blockdraft.api import Decoder
    from blockdraft.models import LoadedModel
    from blockdraft.testing import tiny_tokenizer

    model = tiny_models(0, torch.float32)
    dec = Decoder(LoadedModel(model, tiny_tokenizer(64), "tiny", "f"), random_feature_head(model, 3).float(), None)
    with pytest.raises(BlockdraftError, match="the oracle analysis needs BPD draft heads"):
        teacher_forced_topk(dec, [1, 2, 3], [4, 5, 6], k=2)
    assert dec.generate(ids=[1, 2, 3], method="bpd-0gram-p2", max_new_tokens=8).new_tokens == 8
