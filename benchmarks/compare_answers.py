"""How many answers of one method differ between two `blockdraft bench` runs (e.g. the same
questions decoded in bfloat16 and in float32), turn by turn, and where each first differs.

Why: bfloat16 changes the model's arithmetic, so its greedy text is a (slightly) different
model's; this says how often that shows on the benchmark's prompts.

    python benchmarks/compare_answers.py RUN_A RUN_B [--method ar] [--out runs/answers.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path


def answers(run: Path, method: str) -> dict[tuple[int, int], str]:
    """(question id, turn index) -> answer text, from a bench run's answers/<method>.jsonl."""
    path = run / "answers" / f"{method}.jsonl"
    if not path.is_file():
        sys.exit(f"error: {path} not found (a `blockdraft bench` output folder with method {method!r}?)")
    out = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for turn, text in enumerate(record["choices"][0]["turns"]):
            out[(record["question_id"], turn)] = text
    return out


def first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(a: dict[tuple[int, int], str], b: dict[tuple[int, int], str]) -> dict:
    shared = sorted(set(a) & set(b))
    differing = [{"question_id": q, "turn": t, "first_difference_char": first_difference(a[(q, t)], b[(q, t)]),
                  "chars": [len(a[(q, t)]), len(b[(q, t)])]} for q, t in shared if a[(q, t)] != b[(q, t)]]
    return {"turns": len(shared), "differing": len(differing), "first_turns": sum(t == 0 for _, t in shared),
            "first_turns_differing": sum(d["turn"] == 0 for d in differing), "detail": differing}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--method", default="ar")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result = {"date": datetime.date.today().isoformat(), "method": args.method,
              "runs": [str(args.run_a), str(args.run_b)],
              **compare(answers(args.run_a, args.method), answers(args.run_b, args.method))}
    print(f"{args.method}: {result['differing']} of {result['turns']} answers differ "
          f"({result['first_turns_differing']} of {result['first_turns']} first turns)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
