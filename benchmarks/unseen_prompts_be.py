"""Block efficiency of `bpd` on training-distribution prompts the heads never saw, per domain.

Why: the shipped heads reach 1.49 on Spec-Bench's first turns. This separates what the heads can
do on the kind of prompt they were trained for from the shift to Spec-Bench's prompts. The
prompts are drawn like `blockdraft prompts` draws them, with every source's count doubled, minus
every prompt of the default file, so none of them was distilled: only the same sources'
later items. Also writes the whole unseen pool (--pool) for distillation experiments.

    python benchmarks/unseen_prompts_be.py --per-domain 5 --out runs/unseen-be.jsonl [--pool runs/unseen_all.jsonl]
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
from collections import defaultdict
from pathlib import Path

import torch


def unseen_prompts(source: Path) -> list[dict]:
    """Prompts of a doubled mix that the default mix (what the heads' data came from) does not hold."""
    from blockdraft.data.train_prompts import build_training_prompts, default_mix

    used = {row["id"] for row in build_training_prompts(source)}
    doubled = build_training_prompts(source, {name: 2 * n for name, n in default_mix().items()})
    return [row for row in doubled if row["id"] not in used]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=Path("../shared/data/train_prompts"))
    ap.add_argument("--per-domain", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--heads", default="default", help="draft heads folder (default: the shipped heads)")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "unseen-be.jsonl")
    ap.add_argument("--pool", type=Path, help="also write every unseen prompt here (JSONL)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    import blockdraft

    torch.set_num_threads(2)
    pool = unseen_prompts(args.source)
    if args.pool:
        args.pool.write_text("".join(json.dumps(row) + "\n" for row in pool))
    by_domain: dict[str, list[dict]] = defaultdict(list)
    for row in pool:
        by_domain[row["domain"]].append(row)
    rng = random.Random(args.seed)
    picked = [row for domain, rows in sorted(by_domain.items()) for row in rng.sample(rows, min(args.per_domain, len(rows)))]
    dec = blockdraft.load(heads=args.heads)
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    equal = 0
    with args.out.open("w", encoding="utf-8") as sink:
        for row in picked:
            ref = dec.generate(row["turns"][0], method="ar", max_new_tokens=args.max_new_tokens)
            got = dec.generate(row["turns"][0], method="bpd", max_new_tokens=args.max_new_tokens)
            equal += got.ids == ref.ids
            for key in (row["domain"], "all"):
                totals[key][0] += got.new_tokens
                totals[key][1] += got.steps
            sink.write(json.dumps({"id": row["id"], "domain": row["domain"], "new_tokens": got.new_tokens,
                                   "steps": got.steps, "equal_to_ar": got.ids == ref.ids}) + "\n")
            sink.flush()
    print(f"{len(picked)} unseen prompts, {equal} outputs equal to ar")
    print(" ".join(f"{key} {tokens / steps:.2f}" for key, (tokens, steps) in sorted(totals.items())))


if __name__ == "__main__":
    main()
