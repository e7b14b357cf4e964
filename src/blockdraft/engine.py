"""The decode loop: prefill, then per step ONE target forward over [pending token + draft tree].

Each step (Stern et al. 2018, with Kim et al. 2024's refinement stage):
  1. tree    = the pending token + the drafts of the previous step, shared prefixes merged
  2. forward = one target call: logits and hidden state at every tree node
  3. accept  = the longest tree path that equals the target's choices, plus the target's
               own next token (bonus or recovered): `committed` tokens. The choice is the
               argmax, or under sampling the token the target samples there from noise fixed
               per output position (sampling.PositionNoise): the same walk, exact either way
  4. commit  = the cache keeps the path only (invariant: cache length == len(ids) - 1)
  5. draft   = the drafter on the states of the committed nodes -> lattice -> refiner ->
               drafts for the next step (no extra target call); a refiner may add drafts
               copied from the context (blockdraft.lookup)
Plain decoding is the same loop with an empty draft, so comparisons are fair.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .drafting import Drafter
from .errors import BlockdraftError
from .refine.base import Refiner
from .sampling import PositionNoise, Sampling
from .target import TargetModel
from .tree import build_tree
from .types import DecodeResult, Lattice, StepStats
from .verify import accept_greedy


@dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int = 128
    stop_ids: tuple[int, ...] = ()  # end-of-sequence ids; the first one ends the answer
    stop_strings: tuple[str, ...] = ()  # text that ends the answer (trimmed from `text`)
    max_tree_nodes: int | None = None  # cap on draft-tree nodes per step (None: no cap)
    record_lattices: bool = False  # keep each step's lattice and draft in StepStats
    sampling: Sampling = Sampling()  # greedy by default; temperature > 0 samples exactly


def generate(target: TargetModel, drafter: Drafter, refiner: Refiner, prompt: list[int], cfg: DecodeConfig,
             tokenizer=None, on_commit: Callable[[list[int]], None] | None = None) -> DecodeResult:
    """Decoding with block drafts. Greedy: the ids equal the target's own greedy decode. Sampling:
    the ids equal plain sampling's with the same seed (`NoDrafter`), whatever is drafted, and are
    distributed exactly as the target's own samples."""
    _check_request(target, prompt, cfg)
    noise = None if cfg.sampling.greedy else cfg.sampling.noise()
    prefill_s, prompt_states = target.prefill(prompt[:-1], reserve=len(prompt) + cfg.max_new_tokens,
                                              layers=drafter.layers)
    drafter.begin(prompt_states, prompt)
    ids, out, stats = list(prompt), [], []
    drafts: list[list[int]] = []
    lattice: Lattice | None = None
    reason, began = "", time.perf_counter()
    while not reason:
        # 1. the tree: pending token + drafts; a step commits at most depth + 1 tokens (the
        #    accepted drafts and the target's own next one), so depth + 1 fits the room left
        room = min(cfg.max_new_tokens - len(out), target.max_positions - len(ids))
        tree = build_tree(ids[-1], [d[:room - 1] for d in drafts], cfg.max_tree_nodes)
        # 2. one target forward; 3. acceptance (the argmax, or the sampled token, at each node)
        t0 = time.perf_counter()
        logits, hidden = target.forward(tree, layers=drafter.layers)
        if noise is None:
            verdict = accept_greedy(tree, logits.argmax(-1))
        else:
            verdict = accept_greedy(tree, SampledChoices(logits, cfg.sampling, noise, tree.depths, len(out)))
        # 4. commit the accepted path and the target's own next token
        target.commit(tree, verdict.path)
        new = [tree.tokens[n] for n in verdict.path[1:]] + [verdict.next_token]
        forward_s = time.perf_counter() - t0
        kept, reason = _apply_stops(new, out, cfg, tokenizer)
        target.rollback(len(new) - len(kept))  # keep the invariant when a stop cuts the block
        new = kept
        ids += new
        out += new
        if on_commit and new:
            on_commit(new)
        if not reason and len(ids) >= target.max_positions:
            reason = "context"
        # 5. draft the next block from the committed nodes' states
        t1 = time.perf_counter()
        verified = (lattice, drafts[0] if drafts else None)
        if not reason:
            refiner.accept(ids)
            lattice = drafter.propose(hidden[verdict.path], ids)
            drafts = refiner.refine(lattice, ids)
        stats.append(StepStats(drafted=max(tree.depths), tree_nodes=tree.size,
                               accepted=verdict.n_accepted, committed=len(new), forward_s=forward_s,
                               draft_s=time.perf_counter() - t1,
                               lattice=verified[0] if cfg.record_lattices else None,
                               draft=verified[1] if cfg.record_lattices else None))
    text = _final_text(out, cfg, tokenizer)
    return DecodeResult(ids=out, text=text, steps=len(stats), stop_reason=reason, prefill_s=prefill_s,
                        decode_s=time.perf_counter() - began, stats=stats,
                        seed=None if noise is None else noise.seed)


class SampledChoices:
    """The target's sampled token after each tree node, computed once when acceptance first reads
    it: a step reads only the accepted path and the node where it stops (twice: the walk ends
    there and takes its token), not all N rows of logits [N, V]. Node n's token is output
    position `first + depth(n)`, drawn from that position's noise."""

    def __init__(self, logits: torch.Tensor, sampling: Sampling, noise: PositionNoise, depths: list[int], first: int):
        self.logits, self.sampling, self.noise, self.depths, self.first = logits, sampling, noise, depths, first
        self.tokens: dict[int, int] = {}

    def probs(self, node: int) -> torch.Tensor:
        """The target's sampling distribution after `node` ([V])."""
        return self.sampling.probs(self.logits[node:node + 1])[0]

    def __getitem__(self, node: int) -> int:
        if node not in self.tokens:
            self.tokens[node] = self.noise.choose(self.probs(node), self.first + self.depths[node])
        return self.tokens[node]


def _check_request(target: TargetModel, prompt: list[int], cfg: DecodeConfig) -> None:
    if not prompt:
        raise BlockdraftError("empty prompt: give some text to continue")
    if cfg.max_new_tokens <= 0:
        raise BlockdraftError(f"max_new_tokens must be positive, got {cfg.max_new_tokens}")
    if len(prompt) >= target.max_positions:
        raise BlockdraftError(
            f"prompt has {len(prompt)} tokens but the model's context holds {target.max_positions}; shorten it"
        )


def _apply_stops(new: list[int], out: list[int], cfg: DecodeConfig, tokenizer) -> tuple[list[int], str]:
    """Cut the step's tokens at the first stop id, stop string or the token budget, token by
    token in order, as plain decoding meets them (a stop string ending before an end-of-turn id
    in the same block stops there, as a stop string)."""
    for i, token in enumerate(new):
        if token in cfg.stop_ids:
            return new[: i + 1], "eos"
        if cfg.stop_strings and tokenizer is not None:
            text = tokenizer.decode(out + new[: i + 1], skip_special_tokens=True)
            if any(s in text for s in cfg.stop_strings):
                return new[: i + 1], "stop_string"
    room = cfg.max_new_tokens - len(out)
    if len(new) >= room:
        return new[:room], "max_new_tokens"
    return new, ""


def _final_text(out: list[int], cfg: DecodeConfig, tokenizer) -> str:
    if tokenizer is None:
        return ""
    text = tokenizer.decode(out, skip_special_tokens=True)
    cuts = [text.find(s) for s in cfg.stop_strings if s in text]
    return text[: min(cuts)] if cuts else text
