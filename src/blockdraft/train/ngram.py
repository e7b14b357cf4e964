"""`blockdraft train-ngram`: a token n-gram LM on the base model's own answers.

Like the paper's C4 n-gram models it is task-independent: trained once on the whole
self-distillation corpus (the answers, i.e. what verification will accept), minus the
sequences held out from head training, which `blockdraft tune` uses.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..jsonl import read_jsonl
from ..refine.ngram import NgramLM, train_ngram
from .heads import HeadsTrainConfig, heldout_sequences


def train_ngram_on_distill(data_dir: str | Path, order: int, prune, out: str | Path, arpa: str | None = None,
                           vocab_size: int | None = None) -> NgramLM:
    records = [rec for _, rec in read_jsonl(Path(data_dir) / "distill.jsonl", on_error="skip")]
    split = HeadsTrainConfig()  # the sequences head training held out stay unseen here too
    held = heldout_sequences(len(records), split.heldout, split.seed)
    answers = [rec["answer_ids"] for i, rec in enumerate(records) if i not in held and rec.get("answer_ids")]
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    # the model's vocabulary (recorded by distill); else the largest id seen
    vocab = vocab_size or meta.get("vocab_size") or max(max(a) for a in answers) + 1
    lm = train_ngram(answers, order=order, prune=prune, vocab_size=vocab)
    lm.meta.update({"data": str(data_dir), "sequences": len(answers), "alpha": {"default": 1.0}})
    lm.save(out)
    if arpa:
        lm.write_arpa(arpa)
    return lm
