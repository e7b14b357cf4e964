"""Grouped-query bfloat16 attention whose every query row is computed exactly as plain decoding
computes it: a token's logits must not depend on which other tree nodes share its forward, or
drafted steps could pick another token than plain decoding.

Why not SDPA: on this CPU, bfloat16 SDPA (a fused kernel chosen by query count and mask) moved
SmolLM2's logits by up to 0.75 between a 1-node and a 2+-node forward. What stays exact here
(tests/test_fastpath.py checks each, bit for bit): a score q.k does not depend on how many
queries or keys share the product; a row's softmax depends only on that row's vector; and a
row's probabilities-times-values product depends only on the keys it reduces over, in order,
padded to a multiple of KEY_BLOCK with zero-probability keys at the end (with the exact count,
the reductions' scalar tails moved real SmolLM2 logits by up to 0.6).

So a tree row reduces over the layout plain decoding gives it (the cache, then its ancestors in
depth order, then padding). A tree's rows fall into root-to-leaf paths; the rows of one path
share that layout, so each path needs a product over the cache with its nodes written right
after it (a few rows of copying), not a copy of the whole cache per row; a product takes at
most `rows_per_product` rows, the count up to which a row's result stays its own.

The cache's dtype picks the products' arithmetic: bfloat16 products (scores rounded to bfloat16)
or float32 ones over the same bfloat16 values widened, 2.4x faster here for one token over 200
keys and 2x over 4,000 (oneDNN's small bfloat16 products cost ~28 us each whatever their size).
float32 products keep a row's result only where the CPU's kernels do (here: from one token's
rows, the query heads of a key head, up to 16 tokens' rows, over the same key count, for
SmolLM2's 64-wide heads in groups of 3; not in groups of 1 or 2, nor 128-wide heads in groups
of 4), and how the kernels split the work depends on the key heads and threads, so
`cache_dtype` probes that once per head shape and thread count.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

KEY_BLOCK = 64  # bfloat16 attention reduces over key counts rounded up to this
LAYOUT = "per-path, own key count, cache copied then tail gathered"  # how tree rows get their layout (cost curves measured under another are stale)


FLOAT32_TOKENS = 16  # tokens' rows per float32 product, at most (what cache_dtype probes)


def rows_per_product(group: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """How many query rows (of `group` heads each) one product may take and still give each row
    what a product of its own gives. bfloat16: measured here over widths up to 8,192 keys,
    oneDNN's products keep a row's result up to 16 product rows (past that, kernels change at
    some widths), except single-head rows (group 1), which only match alone at some widths.
    float32: FLOAT32_TOKENS, where cache_dtype found them exact."""
    if dtype == torch.float32:
        return FLOAT32_TOKENS
    return 16 // group if group > 1 else 1


def cache_dtype(head_dim: int, group: int, kv_heads: int = 1) -> torch.dtype:
    """The dtype to keep a bfloat16 model's keys and values in: float32 (faster products) where
    float32 products keep each row's result on this CPU for `kv_heads` key heads of `head_dim`
    with `group` query heads each, else bfloat16."""
    exact = _float32_rows_exact(head_dim, group, kv_heads, torch.get_num_threads())
    return torch.float32 if exact else torch.bfloat16


@functools.cache
def _float32_rows_exact(head_dim: int, group: int, kv_heads: int, threads: int) -> bool:
    """Whether float32 products of 1..FLOAT32_TOKENS tokens' rows give the first and last token's
    rows what a product of that token's rows alone gives (scores also over fewer keys; probed
    once per shape and thread count, which change how the kernels split the work; ~0.5 s)."""
    g = torch.Generator().manual_seed(0)
    for width in (KEY_BLOCK, 3 * KEY_BLOCK, 16 * KEY_BLOCK, 17 * KEY_BLOCK, 64 * KEY_BLOCK, 128 * KEY_BLOCK):
        keys, values = (torch.randn(1, kv_heads, width + KEY_BLOCK, head_dim, generator=g).bfloat16().float()
                        for _ in range(2))
        for tokens in range(1, FLOAT32_TOKENS + 1):
            rows = torch.randn(1, kv_heads, tokens * group, head_dim, generator=g).bfloat16().float()
            probs = torch.randn(1, kv_heads, tokens * group, width, generator=g).softmax(-1)
            scores = rows @ keys[:, :, : width - tokens].transpose(-1, -2)
            mixed = probs @ values[:, :, :width]
            for token in {0, tokens - 1}:
                own = slice(token * group, (token + 1) * group)
                alone = rows[:, :, own] @ keys.transpose(-1, -2)
                if not (torch.equal(alone[..., : width - tokens], scores[:, :, own])
                        and torch.equal(probs[:, :, own] @ values[:, :, :width], mixed[:, :, own])):
                    return False
    return True


def padded_keys(count: int) -> int:
    """The key count a bfloat16 attention call reduces over: `count` rounded up to KEY_BLOCK."""
    return -(-count // KEY_BLOCK) * KEY_BLOCK


@dataclass(frozen=True)
class PathLayout:
    """A tree call's rows grouped by root-to-leaf path; built once per call, used by every layer.

    Rows are reordered by `order` so that each path's rows are one slice; `paths` holds each
    slice's bounds, its path's tree nodes in depth order, and whether those nodes already sit in
    cache order (a chain). Every row reads the cache first, in order; `tail` [1, 1, N, 1, width -
    cache] names the call's own key each reordered row reads at each later place of its
    plain-decoding layout, and `hidden` (same shape) is True on the padding. `reach` holds each
    reordered row's own padded key count (what plain decoding reduces over). The shapes
    broadcast over a call's key heads and query groups, so no layer rebuilds them."""

    order: torch.Tensor | None  # None: the rows are in path order already
    restore: torch.Tensor | None  # inverse of order
    paths: tuple[tuple[int, int, torch.Tensor, bool], ...]
    tail: torch.Tensor
    hidden: torch.Tensor
    width: int
    reach: tuple[int, ...]


def path_layout(allowed: torch.Tensor, valid: int) -> PathLayout | None:
    """The layout of a call whose N rows see the whole cache and each a chain of the call's nodes
    (ancestors before descendants, itself last): any token tree. None for other visibility.
    allowed [N, valid] (True = may attend), the last N keys being the call's own."""
    n = allowed.shape[0]
    past = valid - n
    if past < 0 or not bool(allowed[:, :past].all()):
        return None
    sees = allowed[:, past:valid]
    if not bool(sees.diagonal().all()):
        return None
    depth = sees.sum(-1)  # nodes a row reads: its ancestors and itself
    ends = (~(sees & ~torch.eye(n, dtype=torch.bool)).any(0)).nonzero().flatten()  # rows nobody else reads
    owner = sees.T[:, ends].to(torch.int8).argmax(-1)  # each row's path: the first end that reads it
    path_sees = sees[ends[owner]]
    if not bool((sees == (path_sees & (path_sees.cumsum(-1) <= depth[:, None]))).all()):
        return None  # some row's nodes are not the first nodes of its path: not a tree
    nodes = [sees[end].nonzero().flatten() for end in ends.tolist()]
    order = torch.sort(owner, stable=True).indices
    paths, start = [], 0
    for path, count in enumerate(torch.bincount(owner, minlength=len(ends)).tolist()):
        if count:
            chain = bool(torch.equal(nodes[path], torch.arange(len(nodes[path]))))
            paths.append((start, start + count, nodes[path], chain))
        start += count
    width = padded_keys(past + int(depth.max()))
    row_nodes = torch.zeros(n, n, dtype=torch.long)  # each row's path nodes, in depth order
    for row, path in enumerate(owner.tolist()):
        row_nodes[row, : len(nodes[path])] = nodes[path]
    place = torch.arange(width - past)  # places after the cache
    hidden = place[None, :] >= depth[:, None]
    tail_place = place.clamp(max=n - 1).expand(n, width - past)
    restore = torch.empty_like(order)
    restore[order] = torch.arange(n)
    reach = tuple(padded_keys(past + count) for count in depth[order].tolist())
    shaped = lambda x: x[order][None, None, :, None, :]  # noqa: E731
    in_order = bool(torch.equal(order, torch.arange(n)))
    return PathLayout(None if in_order else order, None if in_order else restore, tuple(paths),
                      shaped(row_nodes.gather(1, tail_place).masked_fill(hidden, 0)), shaped(hidden), width, reach)


def row_exact_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor | None,
                        scale: float, valid: int | None = None, layout: PathLayout | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v per query row, each row exactly as if decoded alone.

    q [1, H, N, D], keys/values [1, KV, L, D] of which the first `valid` (default: all) are real
    and the rest finite padding (a view of a cache sized in whole KEY_BLOCKs reads as one);
    allowed [N, valid] (None: causal, the last N real keys new). `layout`: path_layout(allowed,
    valid), when the caller calls this for many layers. Scores are rounded to bfloat16 by the
    product, then scaled, masked and normalised in float32. While a tree's paths are worked
    through, `values` past the cache holds each path's nodes in turn; it is restored on return.
    """
    valid = keys.shape[2] if valid is None else valid
    rows = q.to(keys.dtype)
    if allowed is None:
        return _causal(rows, keys, values, scale, valid).to(q.dtype)
    layout = layout or path_layout(allowed, valid)
    if layout is None:
        return _gathered(rows, keys, values, allowed, scale, valid).to(q.dtype)
    return _by_path(rows, keys, values, layout, scale, valid).to(q.dtype)


def _causal(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, valid: int) -> torch.Tensor:
    """A prefill or one token: the rows read key prefixes in order already, one product."""
    b, h, n, d = q.shape
    kv = keys.shape[1]
    width = padded_keys(valid)
    keys, values = _pad_keys(keys, width), _pad_keys(values, width)
    grouped = q.reshape(b, kv, h // kv * n, d)
    scores = (grouped @ keys.transpose(-1, -2)).float().view(b, h, n, width) * scale
    if n == 1:  # one token: only the padding is hidden (one fill instead of building a mask)
        scores[..., valid:] = float("-inf")
    else:
        scores.masked_fill_(~torch.ones(n, width, dtype=torch.bool, device=q.device).tril(valid - n), float("-inf"))
    probs = scores.softmax(-1).to(values.dtype)
    return (probs.view(b, kv, h // kv * n, width) @ values).view(b, h, n, d)


def _by_path(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: PathLayout, scale: float,
             valid: int) -> torch.Tensor:
    """A token tree: scores in one product, each row's laid out as plain decoding's, then one
    probabilities-times-values product per path with that path's nodes right after the cache,
    each row reducing over the key count plain decoding gives it (float32 products' sums change
    with zero-probability keys appended)."""
    b, h, n, d = q.shape
    kv, width = keys.shape[1], layout.width
    g, past = h // kv, valid - n
    values = _pad_keys(values, max(width, values.shape[2]))  # a short tensor (not a cache view) is copied
    step = rows_per_product(g, values.dtype)
    rows = q.view(b, kv, g, n, d)
    rows = (rows if layout.order is None else rows[:, :, :, layout.order]).transpose(2, 3).reshape(b, kv, n * g, d)
    scores = _scores(rows, keys[:, :, :valid], g * (n if values.dtype == torch.bfloat16 else step))
    scores = scores.float().view(b, kv, n, g, valid)
    laid = scores.new_empty(b, kv, n, g, width)  # each row's scores in its plain-decoding layout
    laid[..., :past] = scores[..., :past]
    laid[..., past:] = scores[..., past:].gather(-1, layout.tail.expand(b, kv, n, g, width - past)) \
        .masked_fill_(layout.hidden, float("-inf"))
    probs = laid.mul_(scale).softmax(-1).to(values.dtype)
    out = torch.empty(b, kv, n, g, d, dtype=values.dtype)
    own = None  # the call's own values, while the cache holds another path's nodes
    for start, stop, nodes, chain in layout.paths:
        if not chain or own is not None:
            own = values[:, :, past:valid].clone() if own is None else own
            values[:, :, past:past + len(nodes)] = own[:, :, nodes]
        for first, last in _runs(layout.reach, start, stop, step):
            reach = layout.reach[first]
            path_probs = probs[:, :, first:last, :, :reach].reshape(b, kv, (last - first) * g, reach)
            out[:, :, first:last] = (path_probs @ values[:, :, :reach]).view(b, kv, last - first, g, d)
    if own is not None:
        values[:, :, past:valid] = own
    out = out if layout.restore is None else out[:, :, layout.restore]
    return out.transpose(2, 3).reshape(b, h, n, d)


def _runs(reach: tuple[int, ...], start: int, stop: int, step: int) -> list[tuple[int, int]]:
    """Rows [start, stop) cut into runs of at most `step` rows with one reach each."""
    runs, first = [], start
    for row in range(start + 1, stop + 1):
        if row == stop or row - first == step or reach[row] != reach[first]:
            runs.append((first, row))
            first = row
    return runs


def _scores(rows: torch.Tensor, keys: torch.Tensor, per_product: int) -> torch.Tensor:
    """rows [B, KV, M, D] @ keys^T, at most `per_product` rows per product."""
    if rows.shape[2] <= per_product:
        return rows @ keys.transpose(-1, -2)
    return torch.cat([part @ keys.transpose(-1, -2) for part in rows.split(per_product, 2)], 2)


def _gathered(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, scale: float,
              valid: int) -> torch.Tensor:
    """Any visibility: each row's visible keys copied out in order (slow: a cache copy per row),
    rows with the same padded key count in one product (a row reduces over its own)."""
    b, h, n, d = q.shape
    widths = torch.tensor([padded_keys(int(count)) for count in allowed[:, :valid].sum(-1).tolist()])
    out = torch.empty(b, h, n, d, dtype=values.dtype)
    for width in widths.unique().tolist():
        rows = (widths == width).nonzero().flatten()
        out[:, :, rows] = _gathered_rows(q[:, :, rows], keys, values, allowed[rows], scale, valid, width)
    return out


def _gathered_rows(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, scale: float,
                   valid: int, width: int) -> torch.Tensor:
    """_gathered for rows that all reduce over `width` keys."""
    b, h, n, d = q.shape
    kv = keys.shape[1]
    g = h // kv
    positions = torch.arange(valid, device=q.device)
    order = torch.sort(torch.where(allowed[:, :valid], positions, valid), -1).values
    order = torch.cat([order, order.new_full((n, max(0, width - order.shape[1])), valid)], -1)[:, :width]
    pad = order >= valid
    order = order.masked_fill(pad, 0)
    k_rows = keys[0][:, order]  # [KV, N, W, D]
    v_rows = values[0][:, order]
    q_rows = q[0].reshape(kv, g, n, d).transpose(1, 2)  # [KV, N, g, D]
    scores = (q_rows @ k_rows.transpose(-1, -2)).float() * scale  # [KV, N, g, W]
    probs = scores.masked_fill_(pad[None, :, None, :], float("-inf")).softmax(-1).to(values.dtype)
    out = probs @ v_rows  # [KV, N, g, D]
    return out.transpose(1, 2).reshape(1, h, n, d)


def _pad_keys(x: torch.Tensor, width: int) -> torch.Tensor:
    """x [B, KV, L, D] cut or zero-padded to `width` keys (a view where it is long enough)."""
    if x.shape[2] >= width:
        return x[:, :, :width]
    return torch.cat([x, x.new_zeros(*x.shape[:2], width - x.shape[2], x.shape[3])], 2)
