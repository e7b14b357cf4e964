"""The committed training corpus: shards appended, never rewritten; every fault one line."""
import json

import numpy as np
import pytest

from blockdraft.cli import main
from blockdraft.corpus import MANIFEST, Corpus, CorpusRecord
from blockdraft.errors import BlockdraftError
from blockdraft.models import LoadedModel, model_fingerprint
from blockdraft.testing import tiny_llama, tiny_tokenizer
from blockdraft.train.distill import DistillConfig, corpus_identity, distill, pack_distilled
from blockdraft.train.heads import load_sequences

IDENTITY = {"model": "tiny", "model_fingerprint": "abc", "dtype": "float32", "vocab_size": 64,
            "generation": {"decoding": "greedy", "max_new_tokens": 8}}


def _records(n: int, start: int = 0, seed: int = 0) -> list[CorpusRecord]:
    rng = np.random.default_rng(seed)
    return [CorpusRecord(f"src/file:{i}", "math" if i % 2 else "chat", "src",
                         rng.integers(0, 64, rng.integers(1, 9)), rng.integers(0, 64, rng.integers(1, 9)))
            for i in range(start, start + n)]


def test_append_round_trips_and_never_rewrites(tmp_path):
    corpus = Corpus.create_or_open(tmp_path / "c", IDENTITY)
    first = _records(5)
    entry = corpus.append(first, {"src": "MIT"})
    shard0 = (tmp_path / "c" / entry["file"]).read_bytes()
    assert entry["records"] == 5 and entry["sources"] == {"src": {"records": 5, "license": "MIT"}}
    assert entry["answer_tokens"] == sum(len(r.answer_ids) for r in first)
    # Overlapping records: only the new ones land, in a new shard; the old shard is untouched.
    second = corpus.append(_records(5, start=3, seed=1), {"src": "MIT"})
    assert second["records"] == 3 and second["file"] != entry["file"]
    assert (tmp_path / "c" / entry["file"]).read_bytes() == shard0
    assert corpus.append(_records(2), {}) is None  # nothing new
    reopened = Corpus.open(tmp_path / "c")
    got = {r.id: r for r in reopened.records()}
    assert len(got) == 8
    for r in first:
        assert got[r.id].prompt_ids.tolist() == r.prompt_ids.tolist()
        assert got[r.id].answer_ids.tolist() == r.answer_ids.tolist()
        assert got[r.id].domain == r.domain
    assert reopened.summary()["records"] == 8 and reopened.answer_tokens() == sum(s["answer_tokens"] for s in reopened.shards)


def test_a_run_at_another_dtype_extends_the_corpus_and_each_shard_names_its_dtype(tmp_path):
    corpus = Corpus.create_or_open(tmp_path / "c", IDENTITY)
    corpus.append(_records(3), {})
    reopened = Corpus.create_or_open(tmp_path / "c", {**IDENTITY, "dtype": "bfloat16"})  # same model, same settings
    reopened.append(_records(2, start=3), {}, dtype="bfloat16")
    again = Corpus.open(tmp_path / "c")
    assert [again.shard_dtype(s) for s in again.shards] == ["float32", "bfloat16"]
    assert again.manifest["dtype"] == "float32"  # the first run's: what shards naming no dtype hold
    tokens = again.summary()["answer_tokens_by_dtype"]
    assert tokens == {"float32": again.shards[0]["answer_tokens"], "bfloat16": again.shards[1]["answer_tokens"]}
    assert len(list(again.records())) == 5
    del again.manifest["shards"][0]["dtype"]  # a shard written before shards named their dtype
    assert again.shard_dtype(again.shards[0]) == "float32"


def test_corrupt_truncated_and_foreign_corpora_are_one_line(tmp_path):
    corpus = Corpus.create_or_open(tmp_path / "c", IDENTITY)
    entry = corpus.append(_records(4), {})
    shard = tmp_path / "c" / entry["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(BlockdraftError, match="corrupt or truncated") as err:
        list(Corpus.open(tmp_path / "c").records())
    assert "\n" not in str(err.value)
    shard.write_bytes(data)
    with pytest.raises(BlockdraftError, match="model_fingerprint"):
        Corpus.create_or_open(tmp_path / "c", {**IDENTITY, "model_fingerprint": "other"})
    with pytest.raises(BlockdraftError, match="generation"):
        Corpus.create_or_open(tmp_path / "c", {**IDENTITY, "generation": {"decoding": "greedy", "max_new_tokens": 9}})
    (tmp_path / "c" / MANIFEST).write_text("{not json")
    with pytest.raises(BlockdraftError, match="not valid JSON"):
        Corpus.open(tmp_path / "c")
    (tmp_path / "c" / MANIFEST).write_text(json.dumps({"format": 1, "shards": "x"}))
    with pytest.raises(BlockdraftError, match="missing or not"):
        Corpus.open(tmp_path / "c")
    with pytest.raises(BlockdraftError, match="not a corpus folder"):
        Corpus.open(tmp_path / "nothing")
    with pytest.raises(BlockdraftError, match="outside the vocabulary"):
        Corpus.create_or_open(tmp_path / "d", IDENTITY).append(
            [CorpusRecord("a", "", "", np.array([1]), np.array([64]))], {})


def test_distill_packs_into_corpus_and_skips_known_prompts(tmp_path):
    model = tiny_llama(3, vocab=64)
    loaded = LoadedModel(model, tiny_tokenizer(64), "tiny", model_fingerprint(model))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "domain": "chat", "source": "s", "license": "MIT",
                                           "turns": [f"tell a story {i}"]}) + "\n" for i in range(7)))
    corpus_dir = tmp_path / "corpus"
    distill(loaded, prompts, tmp_path / "run1", DistillConfig(max_new_tokens=5, limit=4, batch_size=2, corpus=str(corpus_dir), shard_records=2))
    corpus = Corpus.open(corpus_dir)
    assert sum(s["records"] for s in corpus.shards) == 4 and len(corpus.shards) >= 2
    assert corpus.shards[0]["sources"]["s"]["license"] == "MIT"
    assert [s["dtype"] for s in corpus.shards] == ["float64"] * len(corpus.shards)  # each shard names the dtype that wrote it (the tiny model's)
    # A second run in a fresh working folder skips what the corpus already holds.
    distill(loaded, prompts, tmp_path / "run2", DistillConfig(max_new_tokens=5, corpus=str(corpus_dir)))
    rows = [json.loads(line) for line in (tmp_path / "run2" / "distill.jsonl").open()]
    assert sorted(r["id"] for r in rows) == ["q4", "q5", "q6"]
    assert sorted(r.id for r in Corpus.open(corpus_dir).records()) == [f"q{i}" for i in range(7)]
    # Records in the corpus equal those the run wrote (prompt and answer ids).
    by_id = {r.id: r for r in Corpus.open(corpus_dir).records()}
    assert all(by_id[r["id"]].answer_ids.tolist() == r["answer_ids"] for r in rows)
    # Training reads a corpus folder like a distillation folder.
    seqs, meta = load_sequences(corpus_dir)
    assert len(seqs) == 7 and meta["model_fingerprint"] == loaded.fingerprint
    # Another generation budget is another corpus.
    with pytest.raises(BlockdraftError, match="generation"):
        distill(loaded, prompts, tmp_path / "run3", DistillConfig(max_new_tokens=9, corpus=str(corpus_dir)))
    with pytest.raises(BlockdraftError, match="generation"):
        pack_distilled(tmp_path / "run1", Corpus.create_or_open(tmp_path / "c2", {**corpus_identity(
            json.loads((tmp_path / "run1" / "meta.json").read_text())), "generation": {}}))


def test_cli_corpus_errors_are_one_line(tmp_path, capsys):
    assert main(["corpus", "info", "--corpus", str(tmp_path / "none")]) == 2
    assert main(["corpus", "add", "--corpus", str(tmp_path / "c")]) == 2
    assert main(["corpus", "add", "--corpus", str(tmp_path / "c"), "--from", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("blockdraft: error:") for line in err)
