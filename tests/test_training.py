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
    with pytest.raises(BlockdraftError, match="at least 1"):
        distill(loaded, prompts, tmp_path / "d0", DistillConfig(max_new_tokens=0))
    with pytest.raises(BlockdraftError, match="--batch-size must be 0"):
        distill(loaded, prompts, tmp_path / "d0", DistillConfig(batch_size=-1))
    loaded.model.config.layer_types = ["linear_attention", "full_attention", "full_attention"]
    with pytest.raises(BlockdraftError, match="linear_attention layers keep no attention cache"):
        distill(loaded, prompts, tmp_path / "d0", DistillConfig())
    assert not (tmp_path / "d0").exists()  # refused before anything is written


def test_distill_keeps_the_hidden_states_training_would_compute(loaded, tmp_path):
    """Kept rows (prompts of several lengths, left-padded, resumed) equal a fresh forward over prompt + answer."""
    import torch

    from blockdraft.train.heads import hidden_states, load_sequences

    prompts, out = _prompts(tmp_path / "p.jsonl"), tmp_path / "d"
    distill(loaded, prompts, out, DistillConfig(max_new_tokens=7, limit=5, batch_size=3))
    with (out / "hidden.f16").open("ab") as states:  # a crash mid-row: the resumed run must start on a row boundary
        states.write(b"\0" * 5)
    distill(loaded, prompts, out, DistillConfig(max_new_tokens=7, batch_size=4))
    seqs, _ = load_sequences(out)
    assert len(seqs) == 12 and all(s.hidden_row >= 0 for s in seqs)
    kept = hidden_states(loaded, seqs, out)
    assert not list(out.glob("hidden-*.f16"))  # nothing recomputed, nothing cached
    body, at = loaded.model.get_decoder(), 0
    for s in seqs:
        with torch.no_grad():
            fresh = body(input_ids=torch.tensor([s.ids])).last_hidden_state[0, s.prompt_len - 1: len(s.ids) - 1]
        assert torch.allclose(kept[at:at + len(fresh)].to(fresh.dtype), fresh, atol=2e-2), s
        at += len(fresh)
    assert at == len(kept)


def test_distilled_answers_equal_unbatched_greedy_decoding(loaded, tmp_path):
    """Rows leave the batch as they finish and waiting prompts join it (their cache left-padded to the
    batch's, or the batch's to theirs): every answer still equals the model's own greedy decode."""
    import torch

    from blockdraft.train.distill import _stop_ids

    from collections import Counter

    prompts = _prompts(tmp_path / "p.jsonl")
    distill(loaded, prompts, tmp_path / "d0", DistillConfig(max_new_tokens=12))
    first = [json.loads(line)["answer_ids"] for line in (tmp_path / "d0" / DATA_FILE).open()]
    # a token the random model says mid-answer becomes its end of turn: rows now finish at different steps
    loaded.model.generation_config.eos_token_id = Counter(t for a in first for t in a[1:8]).most_common(1)[0][0]
    out = tmp_path / "d"
    distill(loaded, prompts, out, DistillConfig(max_new_tokens=12, batch_size=5))
    rows = [json.loads(line) for line in (out / DATA_FILE).open()]
    stops = _stop_ids(loaded)
    assert len({len(r["answer_ids"]) for r in rows if r["answer_ids"][-1] in stops}) > 1  # rows left their batch early
    for r in rows:
        prompt = torch.tensor([r["prompt_ids"]])
        ref = loaded.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12,
                                    eos_token_id=sorted(stops), pad_token_id=0)[0, prompt.shape[1]:].tolist()
        cut = next((i + 1 for i, t in enumerate(ref) if t in stops), len(ref))
        assert r["answer_ids"] == ref[:cut], r["id"]


def test_records_without_kept_states_get_them_from_one_pass(loaded, tmp_path):
    """Older folders (no hidden rows) and records whose rows are missing: computed, the kept ones reused."""
    import torch

    from blockdraft.train.heads import hidden_states, load_sequences

    out = tmp_path / "d"
    distill(loaded, _prompts(tmp_path / "p.jsonl"), out, DistillConfig(max_new_tokens=7))
    seqs, _ = load_sequences(out)
    kept = hidden_states(loaded, seqs, out)
    mixed = [s._replace(hidden_row=-1) if i % 3 == 0 else s for i, s in enumerate(seqs)]
    again = hidden_states(loaded, mixed, out)  # a third recomputed under bfloat16 autocast
    assert list(out.glob("hidden-*.f16")) and torch.allclose(again.float(), kept.float(), atol=0.1)
    span = len(seqs[1].ids) - seqs[1].prompt_len
    first = len(seqs[0].ids) - seqs[0].prompt_len
    assert torch.equal(again[first:first + span], kept[first:first + span])  # a kept record's rows as kept


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
    from blockdraft.train.tune import heldout_records, tune_alpha
    from blockdraft.train.ngram import train_ngram_on_distill

    data = tmp_path / "d"
    distill(loaded, _prompts(tmp_path / "p.jsonl", 30), data, DistillConfig(max_new_tokens=8))
    lm = train_ngram_on_distill(data, 3, 0, tmp_path / "lm.npz")
    assert lm.vocab_size == 64 and lm.order == 3
    dec = Decoder(loaded, random_heads(loaded.model, 3), None)
    dec.use_refiner_files(ngram=tmp_path / "lm.npz")
    records = heldout_records(data, per_domain=5)
    assert records and all(r["domain"] == "writing" for r in records)
    report = tune_alpha(dec, records, "ngram", grid=(0.1, 1.0), topk=4)
    assert set(report["alpha"]) == {"writing", "default"} and len(report["curve"]["default"]) == 2
    assert all(c >= 1.0 for c in report["curve"]["default"])


def test_answer_stream_matches_greedy_as_rows_join_widen_and_drain(loaded):
    """Mixed prompt lengths, stop tokens met early, more prompts than rows: every prompt's answer
    (and its kept hidden states) comes out once, equal to decoding it alone."""
    import random
    from collections import Counter

    import torch

    from blockdraft.testing import reference_greedy
    from blockdraft.train.distill import _answer_stream

    model, body = loaded.model, loaded.model.get_decoder()
    rng = random.Random(0)
    common = Counter(t for n in (3, 5, 8) for t in reference_greedy(model, list(range(1, n + 1)), 12)).most_common(2)
    for batch, max_new, eos in ((1, 4, set()), (3, 9, {common[0][0]}), (4, 12, {common[1][0]}), (8, 1, set())):
        prompts = [[rng.randrange(1, 64) for _ in range(rng.choice([1, 2, 7, 15, 30]))] for _ in range(13)]
        out = list(_answer_stream(loaded, prompts, max_new, eos, batch))
        assert sorted(i for i, _, _ in out) == list(range(len(prompts)))  # each prompt once
        for i, answer, hidden in out:
            assert answer == reference_greedy(model, prompts[i], max_new, tuple(eos)), (batch, i)
            with torch.no_grad():
                fresh = body(input_ids=torch.tensor([prompts[i] + answer])).last_hidden_state[0, len(prompts[i]) - 1: -1]
            assert hidden.shape[0] == len(answer) and torch.allclose(hidden.to(fresh.dtype), fresh, atol=2e-2, rtol=1e-2)
