"""Tuning alpha by exact offline simulation on held-out distillation data (`blockdraft tune`).

Greedy decoding is lossless, so the committed text of any drafting method is the base model's
greedy answer, which the distillation data already holds. A step accepts draft tokens only while
they equal that answer, so every quantity a chain refiner needs along the accepted prefix (the
heads' lattice at each position, the rescorer's log-probs after the true prefix) comes from one
teacher-forced pass per sequence, and the block efficiency of each alpha follows without
decoding again.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import BlockdraftError
from ..heads import following_ids
from ..refine.pbest import pbest_paths

ALPHA_GRID = (0.1, 0.5, 0.75, 0.9, 1.0, 1.1, 1.5, 2.0, 5.0, 10.0)  # the paper's grid


@dataclass
class ForcedSequence:
    """Teacher-forced views of one greedy answer."""

    ids: list[int]  # prompt + answer
    prompt_len: int
    lattice_tokens: np.ndarray  # [L, K, k] heads' top-k from the hidden state at each index
    lattice_logprobs: np.ndarray  # [L, K, k]
    rescorer_logprobs: torch.Tensor | None  # [L, V] rescorer log-probs after ids[: i + 1]


@torch.inference_mode()
def force(decoder, ids: list[int], prompt_len: int, topk: int, with_rescorer: bool) -> ForcedSequence:
    """One target forward and one rescorer forward over the whole sequence."""
    x = torch.tensor([ids], device=decoder.target.device)
    heads = decoder.require_heads()
    hidden = decoder.target.body(input_ids=x).last_hidden_state[0]
    toks, lps = [], []
    before = following_ids(ids, 0, len(ids), heads.num_heads)  # chained heads' inputs
    for first in range(0, len(ids), 64):  # [64, K, V] logits at a time
        part = slice(first, first + 64)
        lp = torch.log_softmax(heads.logits(hidden[part], decoder.target.lm_head, before[part]).float(), -1)
        top = lp.topk(topk, dim=-1)
        toks.append(top.indices.cpu().numpy()); lps.append(top.values.cpu().numpy())
    resc = None
    if with_rescorer:
        resc = torch.log_softmax(decoder.rescorer().model(input_ids=x.cpu()).logits[0].float(), -1)
    return ForcedSequence(ids, prompt_len, np.concatenate(toks), np.concatenate(lps), resc)


def simulate(seq: ForcedSequence, choose) -> tuple[int, int]:
    """(committed tokens, steps) of chain drafting with `choose(seq, q) -> draft` along the answer.

    q is the index of the pending token; the lattice used is the one at index q - 1 (the hidden
    state that predicted ids[q]) and draft position j guesses ids[q + j]. The first step has no
    draft, as in the engine.
    """
    end, q, steps = len(seq.ids), seq.prompt_len, 1
    while q < end - 1:
        draft = choose(seq, q)
        n = 0
        while n < len(draft) and q + 1 + n < end and draft[n] == seq.ids[q + 1 + n]:
            n += 1
        q += n + 1
        steps += 1
    return end - seq.prompt_len, steps


def neural_chooser(alpha: float):
    def choose(seq: ForcedSequence, q: int) -> list[int]:
        toks, lps = seq.lattice_tokens[q - 1], seq.lattice_logprobs[q - 1]  # [K, k]
        draft = []
        for j in range(toks.shape[0]):
            r = seq.rescorer_logprobs[min(q + j, len(seq.ids) - 1)]  # after the true prefix ids[: q + j + 1]
            draft.append(int(toks[j][np.argmax(lps[j] + alpha * r[toks[j]].numpy())]))
        return draft
    return choose


def ngram_chooser(lm, alpha: float):
    def choose(seq: ForcedSequence, q: int) -> list[int]:
        paths, _ = pbest_paths(seq.lattice_tokens[q - 1], seq.lattice_logprobs[q - 1].astype(np.float64), lm,
                               seq.ids[max(0, q - 8): q + 1], alpha, 1)
        return paths[0].tolist()
    return choose


def tune_alpha(decoder, records: list[dict], kind: str, grid=ALPHA_GRID, topk: int = 16) -> dict:
    """Block efficiency per domain and alpha; returns {"alpha": {domain: best}, "curve": {...}}."""
    if kind not in ("neural", "ngram"):
        raise BlockdraftError(f"unknown refiner kind {kind!r}; choose neural or ngram")
    totals: dict = defaultdict(lambda: np.zeros((len(grid), 2)))
    for rec in tqdm(records, desc=f"tune {kind}", unit="seq"):
        seq = force(decoder, rec["prompt_ids"] + rec["answer_ids"], len(rec["prompt_ids"]), topk, kind == "neural")
        for i, alpha in enumerate(grid):
            choose = neural_chooser(alpha) if kind == "neural" else ngram_chooser(decoder.ngram(), alpha)
            committed, steps = simulate(seq, choose)
            for key in (rec.get("domain") or "other", "default"):
                totals[key][i] += (committed, steps)
    curve = {d: [round(c / s, 4) for c, s in t] for d, t in totals.items()}
    best = {d: float(grid[int(np.argmax(v))]) for d, v in curve.items()}
    return {"alpha": best, "curve": curve, "grid": list(grid), "sequences": len(records)}


def heldout_records(data_dir: str | Path, per_domain: int) -> list[dict]:
    """Up to `per_domain` records per domain from the sequences the heads held out (train-heads split)."""
    from ..jsonl import read_jsonl
    from .heads import HeadsTrainConfig, heldout_sequences

    records = [rec for _, rec in read_jsonl(Path(data_dir) / "distill.jsonl", on_error="skip")]
    if not records:
        raise BlockdraftError(f"{data_dir} holds no distillation records")
    chosen, count = [], defaultdict(int)
    split = HeadsTrainConfig()  # the default split of train-heads, which made the shipped heads
    for i in sorted(heldout_sequences(len(records), split.heldout, split.seed)):
        domain = records[i].get("domain") or "other"
        if count[domain] < per_domain:
            chosen.append(records[i])
            count[domain] += 1
    return chosen
