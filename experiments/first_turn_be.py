"""Block efficiency on the first turn of every dev question, time-boxed.

Questions go round-robin over categories, so a run stopped by --max-minutes still covers every
category evenly; each prompt's result is appended to OUT as one JSON line as soon as it is
done, and a rerun skips what OUT already holds (resumable). The first method is the reference
for losslessness (use ar).

    python experiments/first_turn_be.py --methods ar,fast,bpd --out runs/first-turn.jsonl --max-minutes 50
    python experiments/first_turn_be.py --summary runs/first-turn.jsonl
    python experiments/first_turn_be.py --summary runs/bench-full/records.jsonl   # a bench run's first turns

Each output file belongs to one set of heads (--heads); copy another run's `ar` lines into a new
file to reuse them as the reference.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch


def run(methods: list[str], out: Path, max_minutes: float, max_new_tokens: int, threads: int, heads: str,
        eagle: str | None = None) -> None:
    import blockdraft
    from blockdraft.bench.datasets import domain_of, load_questions
    from blockdraft.bench.runner import round_robin

    torch.set_num_threads(threads)
    done = {(r["question_id"], r["method"]) for r in _read(out)}
    dec = blockdraft.load(heads=heads, eagle=eagle)
    began = time.time()
    with out.open("a", encoding="utf-8") as sink:
        for q in round_robin(load_questions()):
            if (time.time() - began) / 60 > max_minutes:
                break
            for method in methods:
                if (q["question_id"], method) in done:
                    continue
                r = dec.generate(q["turns"][0], method=method, max_new_tokens=max_new_tokens, domain=domain_of(q["category"]))
                sink.write(json.dumps({"question_id": q["question_id"], "category": q["category"], "method": method,
                                       "ids": r.ids, "new_tokens": r.new_tokens, "steps": r.steps,
                                       "seconds": round(r.seconds, 4)}) + "\n")
                sink.flush()


def summary(path: Path) -> None:
    rows = _read(path)
    methods = sorted(dict.fromkeys(r["method"] for r in rows), key=lambda m: m != "ar")  # ar first: the reference
    ref = {r["question_id"]: r["ids"] for r in rows if r["method"] == methods[0]}
    complete = {q for q in ref if all(any(r["question_id"] == q and r["method"] == m for r in rows) for m in methods)}
    print(f"{len(complete)} questions with every method; reference {methods[0]}")
    for m in methods:
        mine = [r for r in rows if r["method"] == m and r["question_id"] in complete]
        cats: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in mine:
            cats[r["category"]][0] += r["new_tokens"]; cats[r["category"]][1] += r["steps"]
        tokens, steps = sum(r["new_tokens"] for r in mine), sum(r["steps"] for r in mine)
        seconds = sum(r["seconds"] for r in mine)
        lossless = sum(r["ids"] == ref[r["question_id"]] for r in mine) / max(1, len(mine))
        per_cat = " ".join(f"{c} {a / b:.2f}" for c, (a, b) in sorted(cats.items()))
        print(f"{m}: BE {tokens / steps:.3f} tokens/s {tokens / seconds:.2f} lossless {lossless:.3f} | {per_cat}")


def _read(path: Path) -> list[dict]:
    """This script's lines, or the first turns of a `blockdraft bench` run's records.jsonl."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [{**r, "new_tokens": len(r["ids"])} if "turn" in r else r for r in rows if r.get("turn", 0) == 0]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="ar,fast,bpd")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--max-minutes", type=float, default=600)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heads", default="default", help="draft heads folder (default: the shipped heads)")
    ap.add_argument("--eagle", default=None, help="eagle drafter folder (default: the shipped one)")
    ap.add_argument("--summary", type=Path, help="print block efficiency per method and category of a finished run")
    args = ap.parse_args()
    if args.summary:
        summary(args.summary)
    else:
        run(args.methods.split(","), args.out, args.max_minutes, args.max_new_tokens, args.threads, args.heads, args.eagle)
