"""TurnRecord: one measured prompt-turn, the unit the runner measures, the store keeps and the report reads."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TurnRecord:
    """One measured prompt-turn of one method: what report.py aggregates."""

    method: str
    question_id: int | str
    category: str
    turn: int
    ids: list[int]
    text: str
    seconds: float
    steps: int
    committed: list[int] | None  # tokens committed per step (None: not observable)
    accepted: list[int] | None  # draft tokens accepted per step (our engine only)
    forward_s: float | None  # sum of StepStats.forward_s (our engine only)
    draft_s: float | None  # sum of StepStats.draft_s: drafting + refinement (our engine only)
    peak_tree_nodes: int | None  # most tokens fed to one verification call
    ttft_s: float | None = None  # time to the first token: prefill + the first step (our engine only)
    error: str | None = None  # why a peer failed on this turn (nothing else measured); None: it ran
