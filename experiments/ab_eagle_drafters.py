"""Two (or more) eagle drafters side by side on the dev split's first turns, interleaved per prompt.

Why: a retrained drafter moves block efficiency by a percent or two, less than the drift of a
shared machine between two bench runs. Interleaving the drafters prompt by prompt in one process
(one model, one cost curve) compares them under the same conditions; every output is checked
equal to the first one's (verification keeps each exact, so all must agree).

    python experiments/ab_eagle_drafters.py --per-category 2 --methods eagle,eagle-ctx \
        --drafters src/blockdraft/assets/eagle/smollm2-135m,runs/eagle10

prints block efficiency and decode tokens/s per drafter and method, then block efficiency per
category. Verdicts in docs/research.md (the eagle drafter's sections).
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--methods", default="eagle,eagle-ctx")
    ap.add_argument("--drafters", required=True, help="comma-separated eagle drafter folders")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import blockdraft
    from blockdraft.bench.datasets import load_questions

    torch.set_num_threads(args.threads)
    methods, drafters = args.methods.split(","), args.drafters.split(",")
    dec = blockdraft.load()
    totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0, 0.0])  # tokens, steps, decode seconds
    by_category: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for q in load_questions(per_category=args.per_category):
        reference = None
        for drafter in drafters:
            dec.use_eagle(drafter)
            for method in methods:
                r = dec.generate(q["turns"][0], method=method, max_new_tokens=args.max_new_tokens)
                reference = reference or r.ids
                if r.ids != reference:
                    raise SystemExit(f"question {q['question_id']}: {method} with {drafter} changed the output")
                total = totals[drafter, method]
                total[0] += r.new_tokens
                total[1] += r.steps
                total[2] += r.decode_s
                counts = by_category[q["category"], drafter, method]
                counts[0] += r.new_tokens
                counts[1] += r.steps
    for (drafter, method), (tokens, steps, seconds) in totals.items():
        print(f"{drafter:45s} {method:10s} block efficiency {tokens / steps:.3f}  decode {tokens / seconds:.1f} tok/s "
              f"({tokens} tokens, {steps} steps)")
    for (category, drafter, method), (tokens, steps) in sorted(by_category.items()):
        print(f"  {category:15s} {drafter[-30:]:30s} {method:10s} {tokens / steps:.3f}")


if __name__ == "__main__":
    main()
