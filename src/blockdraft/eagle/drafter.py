"""EagleDrafter: the eagle layer as a blockdraft drafter, drafting a dynamic tree (EAGLE-2's).

Each step it first takes in the committed positions (the target's fused features, which the
step's single forward computed, into its own KV cache), then grows a tree from the last one:
every expanded node yields its `branch` likeliest tokens; per depth the `beam` likeliest new
nodes (by cumulative draft log-probability) are expanded, all of them in one layer call, until
the likeliest new node would not pay for its verification; at the end the `max_nodes` likeliest
nodes (an ancestor is always at least as likely as its children, so they form a tree) are the
drafts. Never calls the target; deterministic given the committed ids and states, so
verification keeps the output exact.
"""
from __future__ import annotations

import math

import torch

from ..sizing import CostCurve, more_nodes_could_pay, profitable_nodes
from ..types import DraftTree
from .model import EagleLayer


class EagleDrafter:
    """Defaults sized for a 2-core CPU: at most 5 deep, 4 nodes expanded per depth (EAGLE-2 takes
    6 and 8). cost: the target's forward-cost curve; with it, the tree keeps only the nodes that
    pay for their verification (their draft probabilities taken as their chances), at most
    `max_nodes`, and stops growing where no deeper node could be kept (docs/research.md: SmolLM2's
    drafting a third cheaper a step at the default dtype)."""

    def __init__(self, layer: EagleLayer, embed: torch.Tensor, max_nodes: int = 32, depth: int = 5, branch: int = 8,
                 beam: int = 4, cost: CostCurve | None = None):
        self.layer, self.embed, self.cost = layer, embed, cost
        self.layers: tuple[int, ...] | None = tuple(layer.config.target_layers)
        self.max_nodes, self.depth, self.branch, self.beam = max_nodes, depth, branch, beam
        # the layer's keys and values [1, KV, capacity, D]: `length` committed positions, then
        # the nodes of the tree being grown (scratch, overwritten by the next step's positions)
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.layer.fc.weight.dtype

    @torch.inference_mode()
    def begin(self, states: torch.Tensor | None, prompt: list[int]) -> None:
        """Take in the prompt's positions (all but the pending last token): position s reads the
        target's features at s and the token x[s+1]."""
        self.length = 0
        if states is not None and len(states):
            self._extend(states, prompt[1: len(states) + 1])

    @torch.inference_mode()
    def propose(self, hidden: torch.Tensor, context: list[int]) -> DraftTree | None:
        """hidden: the fused features of the step's committed nodes [N, F]; their next tokens are
        the last N committed ids."""
        out = self._extend(hidden, context[-hidden.shape[0]:])
        return self._tree(out)

    def _extend(self, states: torch.Tensor, next_tokens: list[int]) -> torch.Tensor:
        """Step 0 over newly committed positions; appends their keys; returns the last output [H]."""
        n = states.shape[0]
        g = self.layer.fuse(states.to(self.dtype))[None]
        emb = self.embed[torch.tensor(next_tokens, device=self.embed.device)].to(self.dtype)[None]
        positions = torch.arange(self.length, self.length + n)
        out, _, _ = self.layer(g, emb, positions, None, None, into=self._places(self.length + n))
        self.length += n
        return out[0, -1]

    def _places(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the first `end` places of the keys and values, grown to twice `end` (the
        filled places copied once) when they hold fewer: each call then writes only its own keys."""
        held = 0 if self.keys is None else self.keys.shape[2]
        if held < end:
            c = self.layer.config
            shape = (1, c.num_key_value_heads, max(256, 2 * end), c.head_dim)
            keys, values = (torch.zeros(shape, dtype=self.dtype, device=self.embed.device) for _ in range(2))
            if self.keys is not None:
                keys[:, :, :held], values[:, :, :held] = self.keys, self.values
            self.keys, self.values = keys, values
        return self.keys[:, :, :end], self.values[:, :, :end]

    def _tree(self, root_out: torch.Tensor) -> DraftTree | None:
        layer = self.layer
        # nodes: token (target id), parent (-1: the root), score (cumulative draft log-probability)
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        outs = root_out[None]  # the outputs of the nodes being expanded (first: the root)
        expanding = [-1]
        grown = GrownTree()
        for d in range(1, self.depth + 1):
            logp = torch.log_softmax(layer.logits(outs).float(), -1)  # [F, V']
            top = logp.topk(min(self.branch, logp.shape[-1]), -1)
            base = top.values.new_tensor([0.0] if d == 1 else [scores[i] for i in expanding])
            new_scores = (base[:, None] + top.values).flatten().tolist()
            first = len(tokens)
            tokens += layer.target_ids(top.indices).flatten().tolist()
            parents += [p for p in expanding for _ in range(top.indices.shape[1])]
            scores += new_scores
            if d == self.depth or not self._deeper_pays(scores, max(new_scores)):
                break
            # expand the likeliest new nodes, all in one call
            pick = sorted(range(first, len(tokens)), key=lambda i: (-scores[i], i))[: self.beam]
            rows = [expanding.index(parents[i]) for i in pick]
            outs = self.expand(grown, outs[torch.tensor(rows)], pick, [parents[i] for i in pick],
                               [tokens[i] for i in pick], d)
            expanding = pick
        return self._select(tokens, parents, scores)

    def expand(self, grown: "GrownTree", features: torch.Tensor, nodes: list[int], parents: list[int],
               tokens: list[int], depth: int) -> torch.Tensor:
        """One layer call over the nodes a level expands: node r reads `features[r]` (its parent's
        output) and its own token, at the position `depth` past the committed text, attending to
        the committed positions and to its ancestors in `grown` (-1: the root, which has none).
        Their keys go right after the tree's earlier ones (`grown` counts them); returns their
        outputs [len(nodes), H]."""
        m = grown.size
        allowed = torch.zeros(len(nodes), self.length + m + len(nodes), dtype=torch.bool)
        allowed[:, : self.length] = True
        for r, (node, parent) in enumerate(zip(nodes, parents)):
            grown.slots[node] = grown.slots[parent] + [m + r]
            allowed[r, [self.length + slot for slot in grown.slots[node]]] = True
        emb = self.embed[torch.tensor(tokens, device=self.embed.device)].to(self.dtype)[None]
        positions = torch.full((len(nodes),), self.length - 1 + depth)
        outs, _, _ = self.layer(features[None], emb, positions, None, allowed,
                                into=self._places(self.length + m + len(nodes)))
        grown.size += len(nodes)
        return outs[0]

    def _deeper_pays(self, scores: list[float], best_new: float) -> bool:
        """Whether a deeper level could change the drafts. A deeper node is never likelier than the
        likeliest new node, so the nodes above it keep their ranks and deeper ones only rank after
        them: if `sizing.more_nodes_could_pay` says no such nodes could, `_select` would keep none
        of them; stop, and save those layer calls."""
        if self.cost is None:
            return True
        above = sorted((s for s in scores if s > best_new), reverse=True)[: self.max_nodes]
        return more_nodes_could_pay([math.exp(s) for s in above], math.exp(best_new), self.cost, self.max_nodes)

    def _select(self, tokens: list[int], parents: list[int], scores: list[float]) -> DraftTree | None:
        """The `max_nodes` likeliest nodes (ancestors first on ties), as root-to-leaf paths."""
        if not tokens or self.max_nodes <= 0:
            return None
        order = sorted(range(len(tokens)), key=lambda i: (-scores[i], i))
        budget = self.max_nodes
        if self.cost is not None:
            budget = min(budget, profitable_nodes([math.exp(scores[i]) for i in order[:budget]], self.cost))
            if not budget:
                return None
        chosen: set[int] = set()
        for i in order:
            if len(chosen) >= budget:
                break
            if parents[i] < 0 or parents[i] in chosen:
                chosen.add(i)
        leaves = chosen - {parents[i] for i in chosen}
        paths, path_scores = [], []
        for leaf in sorted(leaves, key=lambda i: (-scores[i], i)):
            path, a = [], leaf
            while a >= 0:
                path.append(tokens[a])
                a = parents[a]
            paths.append(path[::-1])
            path_scores.append(scores[leaf])
        return DraftTree(paths, path_scores)


class GrownTree:
    """The nodes a tree expanded so far: how many (their keys and values follow the committed
    positions' in the drafter's cache, in expansion order) and the key slots each expanded node's
    row attends to (its ancestors' and its own; the root, -1, has none)."""

    def __init__(self):
        self.size = 0
        self.slots: dict[int, list[int]] = {-1: []}
