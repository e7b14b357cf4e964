"""Does n-gram rescoring help the eagle tree as it helps the heads' lattice? (Kim et al. 2024's
global rescoring, moved inside EAGLE-2's tree growth.)

`NgramEagleDrafter` grows the eagle tree as `EagleDrafter` does, but ranks every node (which to
expand, which to keep) by its draft log-probability plus alpha times the n-gram LM's log-probability
of its path after the committed text; the tree is still sized by the draft probabilities alone
(the cost curve's chances), and it grows to full depth (the early-stop bound assumes the ranking
is the chances'). alpha 0 ranks as `EagleDrafter` does. Output stays exact: verification decides.

    python experiments/eagle_ngram_tree.py --per-category 1 --alphas 0,0.3,0.75

prints block efficiency per alpha over the dev split's first turns, all variants interleaved per
prompt in one process, ids checked equal. Verdict in docs/research.md ("N-gram rescoring inside
the eagle tree").
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from blockdraft.eagle.drafter import EagleDrafter, GrownTree
from blockdraft.refine.ngram import NgramLM
from blockdraft.sizing import profitable_nodes
from blockdraft.types import DraftTree


class NgramEagleDrafter(EagleDrafter):
    """EagleDrafter whose nodes rank by draft log-prob + alpha * n-gram log-prob (sized by the former)."""

    def __init__(self, *args, lm: NgramLM, alpha: float, context_window: int = 8, **kwargs):
        super().__init__(*args, **kwargs)
        self.lm, self.alpha, self.context_window = lm, alpha, context_window
        self.context: list[int] = []

    def propose(self, hidden: torch.Tensor, context: list[int]) -> DraftTree | None:
        self.context = context[-self.context_window:]
        return super().propose(hidden, context)

    def _tree(self, root_out: torch.Tensor) -> DraftTree | None:
        layer = self.layer
        paths: list[list[int]] = []  # each node's tokens from the root
        parents: list[int] = []
        ranks: list[float] = []  # draft + alpha * n-gram log-probs: what orders the nodes
        logps: list[float] = []  # draft log-probs alone: the chances the tree is sized by
        outs, expanding = root_out[None], [-1]
        grown = GrownTree()
        for d in range(1, self.depth + 1):
            top = torch.log_softmax(layer.logits(outs).float(), -1).topk(self.branch, -1)
            children = layer.target_ids(top.indices).tolist()
            first = len(paths)
            for row, parent in enumerate(expanding):
                for token, lp in zip(children[row], top.values[row].tolist()):
                    paths.append((paths[parent] if parent >= 0 else []) + [token])
                    parents.append(parent)
                    logps.append((logps[parent] if parent >= 0 else 0.0) + lp)
                    ranks.append((ranks[parent] if parent >= 0 else 0.0) + lp)
            new = range(first, len(paths))
            if self.alpha:
                lm_lp = self.lm.score_continuations(self.context, np.array([paths[i] for i in new]))[:, -1]
                for i, lp in zip(new, lm_lp.tolist()):
                    ranks[i] += self.alpha * lp
            if d == self.depth:
                break
            pick = sorted(new, key=lambda i: (-ranks[i], i))[: self.beam]
            outs = self.expand(grown, outs[torch.tensor([expanding.index(parents[i]) for i in pick])], pick,
                               [parents[i] for i in pick], [paths[i][-1] for i in pick], d)
            expanding = pick
        order = sorted(range(len(paths)), key=lambda i: (-ranks[i], i))[: self.max_nodes]
        chances = sorted((math.exp(logps[i]) for i in order), reverse=True)
        budget = profitable_nodes(chances, self.cost) if self.cost is not None else len(order)
        chosen: set[int] = set()
        for i in order:
            if len(chosen) < budget and (parents[i] < 0 or parents[i] in chosen):
                chosen.add(i)
        leaves = sorted(chosen - {parents[i] for i in chosen}, key=lambda i: (-ranks[i], i))
        return DraftTree([paths[i] for i in leaves], [ranks[i] for i in leaves]) if leaves else None


def run(per_category: int, alphas: list[float], threads: int, max_new_tokens: int) -> dict[float, tuple[int, int]]:
    """(new tokens, target calls) per alpha over the first turns; every variant's ids equal alpha 0's."""
    import blockdraft
    from blockdraft.bench.datasets import domain_of, load_questions
    from blockdraft.engine import DecodeConfig, generate

    torch.set_num_threads(threads)
    dec = blockdraft.load()
    lm = dec.ngram()
    parts = dec.parts(dec.spec("eagle"))
    cfg = DecodeConfig(max_new_tokens=max_new_tokens, stop_ids=dec.stop_ids())
    totals = {a: (0, 0) for a in alphas}
    for q in load_questions(per_category=per_category):
        reference = None
        for a in alphas:
            drafter = NgramEagleDrafter(parts.eagle, parts.embed, cost=parts.cost, lm=lm, alpha=a)
            _, refiner = dec.build("eagle", domain=domain_of(q["category"]))  # eagle's own refiner
            r = generate(dec.target, drafter, refiner, dec.encode(q["turns"][0]), cfg, dec.tokenizer)
            reference = reference if reference is not None else r.ids
            if r.ids != reference:
                raise AssertionError(f"alpha {a} changed the output of question {q['question_id']}")
            totals[a] = (totals[a][0] + r.new_tokens, totals[a][1] + r.steps)
    return totals


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--alphas", default="0,0.3,0.75")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    for alpha, (tokens, steps) in run(args.per_category, [float(a) for a in args.alphas.split(",")],
                                      args.threads, args.max_new_tokens).items():
        print(f"alpha {alpha:g}: block efficiency {tokens / steps:.3f} ({tokens} tokens, {steps} target calls)")
