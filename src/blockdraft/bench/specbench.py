"""Spec-Bench's own metrics, computed as its evaluation/speed.py computes them from answer files.

Our tables report block efficiency (new tokens / base-model calls) and speed-up as a ratio of
summed seconds. Published Spec-Bench tables use speed.py instead, which this module mirrors
so that our numbers can be set beside them:

- "#Mean accepted tokens": the mean of `accept_lengths` pooled over every decoding step of every
  answer (tokens committed per step, so plain decoding scores 1.00);
- speed-up: the mean over answers of the method's tokens per second (sum of the answer's
  `new_tokens` / sum of its `wall_time`), divided by the same mean for the baseline, whose
  tokens are counted by re-tokenising each turn's text as `len(tokenizer(text).input_ids) - 1`
  (speed.py's count, which assumes the tokenizer adds one BOS token: with a tokenizer that adds
  none, as SmolLM2's, it counts one token fewer per turn, exactly as speed.py would).

speed.py's tasks are the six Spec-Bench groups and "overall"; here they are our report's
columns (overall, mt_bench, then the other categories present). The baseline is Spec-Bench's
own kind, HF `generate` (`hf-greedy`), when the run measured it, else our `ar`.
"""
from __future__ import annotations

from collections.abc import Callable
from statistics import fmean
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .records import TurnRecord


BASELINES = ("hf-greedy", "ar")  # Spec-Bench's "vanilla" is HF generate; ar is the same decode in our engine


def baseline(methods: list[str]) -> str | None:
    """The method speed.py's speed-up is taken against: the first of BASELINES that was measured."""
    return next((m for m in BASELINES if m in methods), None)


def _answers(records: list[TurnRecord]) -> list[list[TurnRecord]]:
    """Records grouped into answers (one per question, its turns in order), as the answer files hold them."""
    by_question: dict = {}
    for r in sorted(records, key=lambda r: r.turn):
        by_question.setdefault(r.question_id, []).append(r)
    return list(by_question.values())


def _speed(answer: list[TurnRecord], tokens: Callable[[TurnRecord], int]) -> float | None:
    seconds = sum(r.seconds for r in answer)
    return sum(tokens(r) for r in answer) / seconds if seconds else None


def metrics(rows: list[TurnRecord], baseline: list[TurnRecord] | None,
            count_tokens: Callable[[str], int] | None) -> dict:
    """speed.py's figures for one method over some answers (baseline: the ar records of the same answers)."""
    steps = [n for r in rows for n in (r.committed or [])]
    observed = bool(rows) and all(r.committed is not None for r in rows)
    speeds = [s for s in (_speed(a, lambda r: len(r.ids)) for a in _answers(rows)) if s is not None]
    base = None
    if baseline and count_tokens is not None:
        base = [s for s in (_speed(a, lambda r: count_tokens(r.text) - 1) for a in _answers(baseline)) if s is not None]
    tps = fmean(speeds) if speeds else None
    tps_base = fmean(base) if base else None
    return {"mean_accepted_tokens": fmean(steps) if observed and steps else None,
            "tokens_per_s": tps, "tokens_per_s_baseline": tps_base,
            "speedup": tps / tps_base if tps is not None and tps_base else None}
