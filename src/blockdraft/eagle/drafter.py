"""EagleDrafter: the eagle layer as a blockdraft drafter, drafting a dynamic tree (EAGLE-2's).

Each step it first takes in the committed positions (the target's fused features, which the
step's single forward computed, into its own KV cache), then grows a tree from the last one:
every expanded node yields its `branch` likeliest tokens; per depth the `beam` likeliest new
nodes (by cumulative draft log-probability) are expanded, all of them in one layer call; at the
end the `max_nodes` likeliest nodes (an ancestor is always at least as likely as its children,
so they form a tree) are the drafts. Never calls the target; deterministic given the committed
ids and states, so verification keeps the output exact.
"""
from __future__ import annotations

import torch

from ..sizing import CostCurve, profitable_nodes
from ..types import DraftTree
from .model import EagleLayer


class EagleDrafter:
    """Defaults sized for a 2-core CPU, where drafting is a quarter of a step: 5 deep, 4 nodes
    expanded per depth (13 ms per step for SmolLM2's layer in bfloat16, against 17 ms for EAGLE-2's
    6 deep and 8 wide; a 1-token target forward takes 44 ms there). cost: the target's forward-cost
    curve; with it, the tree keeps only the nodes that pay for their verification (their draft
    probabilities taken as their chances), at most `max_nodes`."""

    def __init__(self, layer: EagleLayer, embed: torch.Tensor, max_nodes: int = 32, depth: int = 5, branch: int = 8,
                 beam: int = 4, cost: CostCurve | None = None):
        self.layer, self.embed, self.cost = layer, embed, cost
        self.layers: tuple[int, ...] | None = tuple(layer.config.target_layers)
        self.max_nodes, self.depth, self.branch, self.beam = max_nodes, depth, branch, beam
        self.keys = self.values = None  # [1, KV, committed positions, D]
        self.length = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.layer.fc.weight.dtype

    @torch.inference_mode()
    def begin(self, states: torch.Tensor | None, prompt: list[int]) -> None:
        """Take in the prompt's positions (all but the pending last token): position s reads the
        target's features at s and the token x[s+1]."""
        self.keys = self.values = None
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
        past = None if self.keys is None else (self.keys, self.values)
        out, k, v = self.layer(g, emb, positions, past, None)
        self.keys = k if self.keys is None else torch.cat([self.keys, k], 2)
        self.values = v if self.values is None else torch.cat([self.values, v], 2)
        self.length += n
        return out[0, -1]

    def _tree(self, root_out: torch.Tensor) -> DraftTree | None:
        layer = self.layer
        # nodes: token (target id), parent (-1: the root), score; expanded nodes keep their keys
        tokens: list[int] = []
        parents: list[int] = []
        scores = torch.empty(0)
        outs = root_out[None]  # the outputs of the nodes being expanded (first: the root)
        expanding = [-1]
        tree_keys = tree_values = None  # keys of expanded nodes [1, KV, M, D], in `expanded` order
        expanded: list[int] = []
        for d in range(1, self.depth + 1):
            logp = torch.log_softmax(layer.logits(outs).float(), -1)  # [F, V']
            top = logp.topk(min(self.branch, logp.shape[-1]), -1)
            base = torch.zeros(len(expanding)) if d == 1 else scores[torch.tensor(expanding)]
            child_scores = (base[:, None] + top.values).flatten()
            child_tokens = layer.target_ids(top.indices).flatten().tolist()
            first = len(tokens)
            tokens += child_tokens
            parents += [p for p in expanding for _ in range(top.indices.shape[1])]
            scores = torch.cat([scores, child_scores])
            if d == self.depth:
                break
            # expand the likeliest new nodes, all in one call
            new = torch.arange(first, len(tokens))
            pick = new[child_scores.topk(min(self.beam, len(new))).indices].tolist()
            g = torch.stack([outs[expanding.index(parents[i])] for i in pick])[None]
            emb = self.embed[torch.tensor([tokens[i] for i in pick], device=self.embed.device)].to(self.dtype)[None]
            positions = torch.full((len(pick),), self.length - 1 + d)
            m = len(expanded)
            allowed = torch.zeros(len(pick), self.length + m + len(pick), dtype=torch.bool)
            allowed[:, : self.length] = True
            where = {node: i for i, node in enumerate(expanded)}
            for r, i in enumerate(pick):
                a = parents[i]
                while a >= 0:
                    allowed[r, self.length + where[a]] = True
                    a = parents[a]
                allowed[r, self.length + m + r] = True
            past_k = self.keys if tree_keys is None else torch.cat([self.keys, tree_keys], 2)
            past_v = self.values if tree_values is None else torch.cat([self.values, tree_values], 2)
            outs, k, v = layer(g, emb, positions, (past_k, past_v), allowed)
            outs = outs[0]
            tree_keys = k if tree_keys is None else torch.cat([tree_keys, k], 2)
            tree_values = v if tree_values is None else torch.cat([tree_values, v], 2)
            expanded += pick
            expanding = pick
        return self._select(tokens, parents, scores)

    def _select(self, tokens: list[int], parents: list[int], scores: torch.Tensor) -> DraftTree | None:
        """The `max_nodes` likeliest nodes (ancestors first on ties), as root-to-leaf paths."""
        if not tokens or self.max_nodes <= 0:
            return None
        order = sorted(range(len(tokens)), key=lambda i: (-float(scores[i]), i))
        budget = self.max_nodes
        if self.cost is not None:
            budget = min(budget, profitable_nodes(scores[order[:budget]].double().exp().tolist(), self.cost))
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
        for leaf in sorted(leaves, key=lambda i: (-float(scores[i]), i)):
            path, a = [], leaf
            while a >= 0:
                path.append(tokens[a])
                a = parents[a]
            paths.append(path[::-1])
            path_scores.append(float(scores[leaf]))
        return DraftTree(paths, path_scores)
