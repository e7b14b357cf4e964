"""Distillation, head training, n-gram training and tuning on a tiny model (no real model needed)."""
import json

import pytest

from blockdraft.errors import BlockdraftError
from blockdraft.heads import load_heads
from blockdraft.models import LoadedModel, model_fingerprint
from blockdraft.testing import random_heads, tiny_llama, tiny_tokenizer
from blockdraft.train.distill import DATA_FILE, META_FILE, DistillConfig, distill
from blockdraft.train.heads import HeadsTrainConfig, following_tokens, train_heads


@pytest.fixture()
def loaded():
    model = tiny_llama(3, vocab=64)
    return LoadedModel(model, tiny_tokenizer(64), "tiny", model_fingerprint(model))


def _prompts(path, n=12):
    words = "write a short poem about the blue sky . explain how rivers make a story".split()
    rows = [json.dumps({"id": f"q{i}", "domain": "writing", "turns": [" ".join(words[i % 5: i % 5 + 6])]}) for i in range(n)]
    path.write_text("\n".join(rows[:5] + ["{not json", json.dumps({"id": "x", "turns": []})] + rows[5:]) + "\n")
    return path


def test_distill_resumes_and_reports_bad_lines(loaded, tmp_path, capsys):
    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "d"
    distill(loaded, prompts, out, DistillConfig(max_new_tokens=6, limit=4))
    distill(loaded, prompts, out, DistillConfig(max_new_tokens=6))
    err = capsys.readouterr().err
    assert "p.jsonl:6" in err and "p.jsonl:7" in err  # bad lines named, then skipped
    rows = [json.loads(line) for line in (out / "distill.jsonl").open()]
    assert sorted(r["id"] for r in rows) == sorted(f"q{i}" for i in range(12))  # each prompt once
    assert all(0 < len(r["answer_ids"]) <= 6 for r in rows)
    with pytest.raises(BlockdraftError, match="another distillation run"):
        distill(loaded, prompts, out, DistillConfig(max_new_tokens=9))


def test_following_tokens_hold_next_token_then_head_targets():
    t = following_tokens([([10, 11, 12, 13, 14], 2, "")], num_heads=2).tolist()
    # positions t = 1, 2, 3 (prompt length 2): x[t+1] (base model), head 1 -> x[t+2], head 2 -> x[t+3]
    assert t == [[12, 13, 14], [13, 14, -100], [14, -100, -100]]


def _pattern_data(loaded, data):
    """Distillation records whose answers repeat one pattern (next token = current + 3)."""

    data.mkdir()
    (data / META_FILE).write_text(json.dumps({"model": "tiny", "model_fingerprint": loaded.fingerprint}))
    rows = [{"id": f"q{i}", "prompt_ids": [1, 2 + i % 7], "answer_ids": [(5 + 3 * j) % 64 for j in range(i % 5, i % 5 + 30)]}
            for i in range(40)]
    (data / DATA_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


@pytest.mark.parametrize("chain", [False, True])
def test_heads_learn_a_deterministic_answer(loaded, tmp_path, chain):
    """Answers that repeat one pattern: trained heads (plain or chained) must predict it better than chance."""
    import torch

    data = _pattern_data(loaded, tmp_path / "d")
    torch.manual_seed(0)
    cfg = HeadsTrainConfig(num_heads=2, epochs=30, batch_positions=64, lr=1e-2, heldout=0.2, draft_vocab=32, chain=chain)
    heads, report = train_heads(loaded, data, tmp_path / "h", cfg)
    assert min(report["top1"]) > 0.5, report  # chance is 1/32
    assert 0.5 < report["chain_accept"] <= 2
    saved = load_heads(tmp_path / "h")
    assert saved.config.chain is chain and saved.config.draft_vocab_size == 32


def test_train_heads_saves_resumes_and_refuses_mismatch(loaded, tmp_path):
    data = tmp_path / "d"
    distill(loaded, _prompts(tmp_path / "p.jsonl"), data, DistillConfig(max_new_tokens=8))
    cfg = HeadsTrainConfig(num_heads=2, epochs=2, batch_positions=8, heldout=0.2)
    heads, report = train_heads(loaded, data, tmp_path / "h", cfg)
    assert len(report["top1"]) == 2 and 0 <= min(report["top5"]) <= 1
    saved = load_heads(tmp_path / "h")
    assert saved.config.base_fingerprint == loaded.fingerprint and saved.config.training["epochs"] > 0
    with pytest.raises(BlockdraftError, match="already holds another run"):
        train_heads(loaded, data, tmp_path / "h", cfg)
    train_heads(loaded, data, tmp_path / "h", cfg, resume=True)  # finished run: resumes to the end
    other = LoadedModel(tiny_llama(4, vocab=64), loaded.tokenizer, "other", model_fingerprint(tiny_llama(4, vocab=64)))
    with pytest.raises(BlockdraftError, match="another model"):
        train_heads(other, data, tmp_path / "h2", cfg)


def test_ngram_training_and_tuning_run_on_distilled_data(loaded, tmp_path):
    from blockdraft.api import Decoder
    from blockdraft.refine.tune import heldout_records, tune_alpha
    from blockdraft.testing import random_heads
    from blockdraft.train.ngram import train_ngram_on_distill

    data = tmp_path / "d"
    distill(loaded, _prompts(tmp_path / "p.jsonl", 30), data, DistillConfig(max_new_tokens=8))
    lm = train_ngram_on_distill(data, 3, 0, tmp_path / "lm.npz")
    assert lm.vocab_size == 64 and lm.order == 3
    dec = Decoder(loaded, random_heads(loaded.model, 3), None)
    dec.ngram_path = tmp_path / "lm.npz"
    records = heldout_records(data, per_domain=5)
    assert records and all(r["domain"] == "writing" for r in records)
    report = tune_alpha(dec, records, "ngram", grid=(0.1, 1.0), topk=4)
    assert set(report["alpha"]) == {"writing", "default"} and len(report["curve"]["default"]) == 2
    assert all(c >= 1.0 for c in report["curve"]["default"])


def test_feature_head_learns_a_deterministic_answer(loaded, tmp_path):
    """Answers that repeat one pattern: the trained feature head predicts it, from true and from its own features."""
    import torch

    from blockdraft.feature_head import FeatureHead
    from blockdraft.train.feature_head import FeatureTrainConfig, train_feature_head

    data = _pattern_data(loaded, tmp_path / "d")
    torch.manual_seed(0)
    cfg = FeatureTrainConfig(num_heads=3, epochs=40, batch_positions=128, lr=1e-2, heldout=0.2, draft_vocab=32)
    _, report = train_feature_head(loaded, data, tmp_path / "fh", cfg)
    assert report["top1_first"] > 0.5 and report["top1_second"] > 0.5, report  # chance is 1/32
    saved = load_heads(tmp_path / "fh")
    assert isinstance(saved, FeatureHead) and saved.config.draft_vocab_size == 32 and saved.num_heads == 3
    random_heads(loaded.model, 2).save(tmp_path / "bpd")
    with pytest.raises(BlockdraftError, match="holds BPD heads, not a feature head"):
        train_feature_head(loaded, data, tmp_path / "fh2", cfg, init=str(tmp_path / "bpd"))
