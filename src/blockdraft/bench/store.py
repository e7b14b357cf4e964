"""A bench run's measurements on disk, written question by question so a long run can stop and resume.

A full Spec-Bench split takes hours on a CPU: `records.jsonl` gets every finished question's
records as soon as all methods have answered it, and `run.json` says what run they belong to
(methods, model, heads, new tokens, questions). `--resume` keeps the finished questions of the
same run and measures the rest; a folder holding another run, or anything else, is refused in
one line (blockdraft.outdir), and a lock keeps two runs from writing to one folder.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BlockdraftError
from ..outdir import check_free

if TYPE_CHECKING:
    from .records import TurnRecord

RECORDS = "records.jsonl"
RUN = "run.json"
# What a bench run writes into its folder (what --resume accepts there).
OWN = frozenset({RECORDS, RUN, "results.json", "results.md", "answers", "block_efficiency.png", "speedup.png",
                 "committed_per_step.png"})


class RecordStore:
    """Appends each finished question's records to out_dir/records.jsonl."""

    def __init__(self, out_dir: Path, identity: dict, resume: bool):
        self.out_dir, self.identity = out_dir, identity
        self.records: list["TurnRecord"] = self._resumed() if resume else self._fresh()
        self.done = {r.question_id for r in self.records}
        self.resumed = frozenset(self.done)  # measured by an earlier process
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RUN).write_text(json.dumps(identity, indent=1) + "\n", encoding="utf-8")
        self._write(self.records, "w")  # drops the half-measured question of an interrupted run

    def _fresh(self) -> list["TurnRecord"]:
        check_free(self.out_dir, OWN)
        return []

    def _resumed(self) -> list["TurnRecord"]:
        """The records of questions every method finished, if the folder holds this same run."""
        from .records import TurnRecord

        check_free(self.out_dir, OWN, resume=True, marker=RUN)
        run, records = self.out_dir / RUN, self.out_dir / RECORDS
        if not records.exists():
            return []
        try:
            earlier = json.loads(run.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BlockdraftError(f"{run}: unreadable ({exc}); delete the folder to start afresh") from None
        changed = [k for k in self.identity if earlier.get(k) != self.identity[k]]
        if changed:
            raise BlockdraftError(f"{self.out_dir} holds a bench run with other {', '.join(changed)}: "
                                  "--resume needs the same command (or choose another --out)")
        rows: list[TurnRecord] = []
        for number, line in enumerate(records.read_text(encoding="utf-8").splitlines(), 1):
            try:
                rows.append(TurnRecord(**json.loads(line)))
            except (ValueError, TypeError):  # a line cut by a kill: it and what follows are re-measured
                print(f"[blockdraft] bench: {records} line {number} is incomplete; re-measuring from there",
                      file=sys.stderr)
                break
        counts = Counter((r.question_id, r.method) for r in rows)
        finished = {q for q, turns in self.identity["questions"]
                    if all(counts[q, m] == turns for m in self.identity["methods"])}
        return [r for r in rows if r.question_id in finished]

    def add(self, question_records: list["TurnRecord"]) -> None:
        """Keep one question's records (all methods, all turns)."""
        self.records += question_records
        self.done |= {r.question_id for r in question_records}
        self._write(question_records, "a")

    def _write(self, rows: list["TurnRecord"], mode: str) -> None:
        with (self.out_dir / RECORDS).open(mode, encoding="utf-8") as sink:
            for record in rows:
                sink.write(json.dumps(dataclasses.asdict(record), ensure_ascii=False) + "\n")
