"""The context-reading feature head: cache consistency, losslessness, checkpoints, training."""
import functools
import json
import random

import pytest
import torch

from blockdraft.engine import DecodeConfig, generate
from blockdraft.errors import BlockdraftError
from blockdraft.models import LoadedModel, model_fingerprint
from blockdraft.refine.base import ArgmaxRefiner
from blockdraft.target import TargetModel
from blockdraft.testing import random_heads, reference_greedy, tiny_llama, tiny_tokenizer
from blockdraft.train.distill import DATA_FILE, META_FILE

from .drafter import FeatureDrafter
from .model import FeatureHead, load_feature_head, random_feature_head


@pytest.fixture(scope="module")
def tiny_models():
    """Tiny random Llamas by (seed, dtype), each built once."""
    return functools.cache(lambda seed=0, dtype=torch.float64: tiny_llama(seed, dtype))


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
    back = load_feature_head(tmp_path / "fh")
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
        load_feature_head(tmp_path / "fh")


def test_feature_head_sizes_the_layers_can_take(tiny_models, tmp_path):
    random_feature_head(tiny_models(0, torch.float32), 3).float().save(tmp_path / "h", dtype=torch.float32)
    raw = json.loads((tmp_path / "h" / "config.json").read_text())
    for value, words in [(0, "attention_heads must be positive"), (5, "does not split into 5"), ("x", "must be int")]:
        (tmp_path / "h" / "config.json").write_text(json.dumps({**raw, "attention_heads": value}))
        with pytest.raises(BlockdraftError, match=words):
            load_feature_head(tmp_path / "h")
    (tmp_path / "h" / "config.json").write_text(json.dumps(raw))
    assert load_feature_head(tmp_path / "h").config.attention_heads == 4
    random_heads(tiny_models(0, torch.float32), 2).save(tmp_path / "bpd")
    with pytest.raises(BlockdraftError, match="not a feature head"):
        load_feature_head(tmp_path / "bpd")


def test_feature_head_learns_a_deterministic_answer(tmp_path):
    """Answers that repeat one pattern (next token = current + 3): the trained head predicts it,
    from true and from its own features."""
    from .train import FeatureTrainConfig, train_feature_head

    model = tiny_llama(3, vocab=64)
    loaded = LoadedModel(model, tiny_tokenizer(64), "tiny", model_fingerprint(model))
    data = tmp_path / "d"
    data.mkdir()
    (data / META_FILE).write_text(json.dumps({"model": "tiny", "model_fingerprint": loaded.fingerprint}))
    rows = [{"id": f"q{i}", "prompt_ids": [1, 2 + i % 7], "answer_ids": [(5 + 3 * j) % 64 for j in range(i % 5, i % 5 + 30)]}
            for i in range(40)]
    (data / DATA_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    cfg = FeatureTrainConfig(num_heads=3, epochs=40, batch_positions=128, lr=1e-2, heldout=0.2, draft_vocab=32)
    _, report = train_feature_head(loaded, data, tmp_path / "fh", cfg)
    assert report["top1_first"] > 0.5 and report["top1_second"] > 0.5, report  # chance is 1/32
    saved = load_feature_head(tmp_path / "fh")
    assert isinstance(saved, FeatureHead) and saved.config.draft_vocab_size == 32 and saved.num_heads == 3
