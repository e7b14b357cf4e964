"""Block-draft analysis (Kim et al. 2024, sections 4-5): repetition, head confidence, oracle top-k headroom.

`metrics` holds pure functions on plain arrays; `runner.analyze` runs a Decoder on questions and
writes analysis.json / analysis.md / figures (imported lazily: it pulls in torch, tqdm, matplotlib).
"""
from .metrics import (accepted_length, consecutive_repeat_rate, draft_targets, h_max, head_entropy_summary,
                      max_run_mean, oracle_block_efficiency, oracle_bound_steps, oracle_walk, pearson_r,
                      repetition_of_drafts, run_lengths, topk_accuracy, topk_hits)

__all__ = ["accepted_length", "consecutive_repeat_rate", "draft_targets", "h_max", "head_entropy_summary",
           "max_run_mean", "oracle_block_efficiency", "oracle_bound_steps", "oracle_walk", "pearson_r",
           "repetition_of_drafts", "run_lengths", "topk_accuracy", "topk_hits", "analyze"]


def __getattr__(name: str):
    if name == "analyze":
        from .runner import analyze
        return analyze
    raise AttributeError(name)
