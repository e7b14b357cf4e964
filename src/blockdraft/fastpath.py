"""A lean forward for Llama-family targets on CPU: transformers' LlamaModel math, less machinery.

Why: on this project's 2-core CPU a SmolLM2-135M step through transformers spends ~12 of its
~60 ms outside the matrix products (module calls, mask and cache bookkeeping), and runs q, k, v,
gate and up as five small matrix products per layer. Here each step is one loop over the layers
with one static KV cache; q|k|v and gate|up are single fused products (their rows are the same
dot products). Norms and attention are transformers' own functions; the rotary embedding
reads a table computed once per position (blockdraft.rope), so a position's rows never depend
on the call. The logits equal transformers' up to the last bit of the rotary tables (the tests
check them bit for bit against transformers with those tables, and closely without). The target model
itself is untouched and still serves transformers' own generate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaModel, rotate_half

from .cpu import EXACT_ROWS, OneDNNLinear, PackedRows, can_pack, pack_weight, packed_linear, release_pages
from .exact_attention import cache_dtype, padded_keys, path_layout, row_exact_attention
from .int4 import Int4Linear, Int4Weight
from .rope import RopeTable


def unsupported(model: nn.Module) -> str | None:
    """Why `model` cannot take the fast path (None when it can)."""
    body = model.get_decoder()
    cfg = model.config
    if type(body) is not LlamaModel:
        return f"{type(body).__name__} is not a LlamaModel"
    if next(model.parameters()).device.type != "cpu":
        return "not on the CPU"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "projections with biases"
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        return "a non-standard MLP"
    return None


class _Linear:
    """x @ W^T with W packed for oneDNN (CPU float32; bfloat16 on native-bfloat16 CPUs), in 4 bits
    (blockdraft.int4), or kept dense."""

    def __init__(self, weight: torch.Tensor | None, packed: torch.Tensor | None = None, int4: Int4Weight | None = None):
        self.packed, self.int4 = packed, int4
        if packed is None and int4 is None and can_pack(weight):
            self.packed = pack_weight(weight)
        self.weight = None if self.packed is not None or int4 is not None else weight

    def __call__(self, x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """x [1, N, in] @ W^T, at most `rows` rows per product (None: all at once)."""
        if rows is not None and x.shape[1] > rows:
            return torch.cat([self(part, rows) for part in x.split(rows, 1)], 1)
        if self.int4 is not None:  # a prefill (rows None) need not give each row its one-row result
            return self.int4.prefill(x) if rows is None else self.int4(x)
        return packed_linear(x, self.packed) if self.packed is not None else F.linear(x, self.weight)


def _linear(module: nn.Module) -> _Linear:
    if isinstance(module, OneDNNLinear):
        return _Linear(None, module.packed)
    if isinstance(module, Int4Linear) and module.whole:
        return _Linear(None, int4=module.fused)
    return _Linear(module.weight)


def _fused(*modules: nn.Module) -> _Linear:
    """One product for several projections of the same input (q|k|v, gate|up): the model's own
    fused weight when these modules are its rows in order (share_projections), else a private
    fused copy."""
    first = modules[0]
    if (all(isinstance(m, (PackedRows, Int4Linear)) and m.fused is first.fused for m in modules) and first.start == 0
            and all(a.stop == b.start for a, b in zip(modules, modules[1:])) and modules[-1].stop == first.fused.shape[0]):
        return _Linear(None, int4=first.fused) if isinstance(first, Int4Linear) else _Linear(None, first.fused)
    return _Linear(torch.cat([m.weight for m in modules]))


def projection_kind(model: nn.Module) -> str:
    """What multiplies the decoder body's projections (its first q_proj's stand-in or module
    type): step costs, and so cost curves, differ per kind."""
    try:
        q_proj = model.get_decoder().layers[0].self_attn.q_proj
    except (AttributeError, IndexError, TypeError):
        return "unknown"
    return type(q_proj.fused).__name__ if isinstance(q_proj, Int4Linear) else type(q_proj).__name__


def share_projections(model: nn.Module, int4: bool = False) -> int:
    """Pack a CPU Llama model's decoder projections (float32; bfloat16 on native-bfloat16 CPUs) once, in place, as the fast path runs
    them (q|k|v and gate|up fused; o and down alone), dropping the dense weights: the fast path
    and the model's own forward then share one copy. Returns how many projections were replaced.
    int4=True stores them in 4 bits instead (blockdraft.int4; a bfloat16 model).

    Why: dense, oneDNN-packed and fused copies side by side made SmolLM2-135M (0.54 GB) take
    1.9 GB. The dense weights' pages are released at once (cpu.release_pages), so only for a
    model nobody else holds (blockdraft.load's own); restore_linears undoes the swap.
    """
    if unsupported(model) is not None:
        return 0
    weight = model.get_decoder().layers[0].self_attn.q_proj.weight
    if int4 and weight.dtype != torch.bfloat16:
        raise ValueError(f"4-bit weights take bfloat16 inputs; this model is {weight.dtype}")
    if not int4 and not can_pack(weight):
        return 0
    store = _int4_rows if int4 else _packed_rows
    count = 0
    for layer in model.get_decoder().layers:
        att, mlp = layer.self_attn, layer.mlp
        for module, names in ((att, ("q_proj", "k_proj", "v_proj")), (mlp, ("gate_proj", "up_proj")),
                              (att, ("o_proj",)), (mlp, ("down_proj",))):
            parts = [getattr(module, name) for name in names]
            weights = [part.weight.detach() for part in parts]
            fused = weights[0] if len(weights) == 1 else torch.cat(weights)
            for name, replacement in zip(names, store(fused, [part.out_features for part in parts], parts)):
                setattr(module, name, replacement)
            for part in parts:
                release_pages(part.weight)
            count += len(names)
    return count


def _packed_rows(fused: torch.Tensor, sizes: list[int], parts: list[nn.Module]) -> list[nn.Module]:
    """Stand-ins for `parts` (nn.Linear, same input) as rows of one oneDNN-packed weight."""
    if len(parts) == 1:
        return [OneDNNLinear(parts[0], keep_dense=False)]
    packed = pack_weight(fused)
    return [PackedRows(packed, start, start + size) for start, size in zip(_starts(sizes), sizes)]


def _int4_rows(fused: torch.Tensor, sizes: list[int], parts: list[nn.Module]) -> list[nn.Module]:
    """Stand-ins for `parts` as rows of one 4-bit weight."""
    weight = Int4Weight.quantize(fused)
    return [Int4Linear(weight, start, start + size) for start, size in zip(_starts(sizes), sizes)]


def _starts(sizes: list[int]) -> list[int]:
    return [sum(sizes[:i]) for i in range(len(sizes))]


class LlamaFastPath(nn.Module):
    """The decoder body of a LlamaForCausalLM with its own growing static KV cache (batch 1).

    A Module only so that forward hooks see its calls (the benchmark counts calls that way).
    """

    name = "llama-fastpath"

    def __init__(self, model: nn.Module, capacity: int = 512):
        super().__init__()
        body = model.get_decoder()
        cfg = model.config
        self.body = body
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.capacity, self.length = capacity, 0
        self.keys = self.values = torch.empty(0)
        self.layers: list[tuple] = []
        self._built_for: tuple = ()
        self.rope = RopeTable(body.rotary_emb) if RopeTable.fixed(body.rotary_emb) else None

    def reserve(self, positions: int) -> None:
        """Size the cache for at least `positions` at its next reset (it never shrinks), in whole
        KEY_BLOCKs: bfloat16 attention then reads its padded key span as a view, never a copy."""
        self.capacity = max(self.capacity, padded_keys(positions))

    def reset(self) -> None:
        """Empty the cache; (re)build the fused weights if the model's weights changed since."""
        if self._built_for != self._weights_key():
            self._build()
        shape = (len(self.layers), self.kv_heads, self.capacity, self.head_dim)
        dtype = self.cache_dtype()
        if self.keys.shape != shape or self.keys.dtype != dtype:
            self.keys, self.values = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        self.length = 0

    def cache_dtype(self) -> torch.dtype:
        """The keys' and values' dtype: the model's, except that a bfloat16 model's exact attention
        computes in its cache's dtype (exact_attention.cache_dtype: float32 where it stays exact)."""
        dtype = self.body.embed_tokens.weight.dtype
        return cache_dtype(self.head_dim, self.heads // self.kv_heads, self.kv_heads) if dtype == torch.bfloat16 else dtype

    def _linears(self) -> list[nn.Module]:
        return [m for layer in self.body.layers for m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                            layer.self_attn.v_proj, layer.self_attn.o_proj,
                                                            layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]

    def _weights_key(self) -> tuple:
        """What the fused weights were built from: every projection module (held, so compared by
        identity: a swap replaces them) and a plain nn.Linear's weight storage, in-place version
        and dtype (a dtype cast, a weight update). Packed modules never change their weights."""
        return tuple((m, m.weight.data_ptr(), m.weight._version, m.weight.dtype) if type(m) is nn.Linear else (m,)
                     for m in self._linears())

    def _build(self) -> None:
        self.layers = []
        for layer in self.body.layers:
            att, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm,
                _fused(att.q_proj, att.k_proj, att.v_proj),
                _linear(att.o_proj),
                layer.post_attention_layernorm,
                _fused(mlp.gate_proj, mlp.up_proj),
                _linear(mlp.down_proj),
            ))
        self._built_for = self._weights_key()

    def _reserve(self, end: int) -> None:
        """Grow the cache (doubling) so that it holds `end` positions."""
        if end <= self.keys.shape[2]:
            return
        while self.capacity < end:
            self.capacity *= 2
        grown = [torch.zeros(len(self.layers), self.kv_heads, self.capacity, self.head_dim, dtype=self.keys.dtype)
                 for _ in range(2)]
        grown[0][:, :, : self.length] = self.keys[:, :, : self.length]
        grown[1][:, :, : self.length] = self.values[:, :, : self.length]
        self.keys, self.values = grown

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor | None,
                layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final hidden states [N, H] of `tokens` [N] at `positions` [N], appended to the cache, and
        the outputs of decoder `layers`, concatenated [N, len(layers) * H] (None without layers).

        allowed [N, length + N] (True = may attend) gives a tree's visibility; None means causal.
        """
        n, past = tokens.shape[0], self.length
        end = past + n
        self._reserve(end)
        x = self.body.embed_tokens(tokens[None])
        if self.rope is not None:  # a position's rows from one table, whatever the call
            cos, sin = self.rope(positions, x.dtype)
        else:  # frequencies that change with the sequence: transformers' own, per call
            cos, sin = (t[:, None] for t in self.body.rotary_emb(x, positions[None]))
        if allowed is None and n > 1 and past > 0:
            allowed = torch.ones(n, end, dtype=torch.bool).tril(past)
        causal = allowed is None and n > 1
        exact = x.dtype == torch.bfloat16
        layout = path_layout(allowed, end) if exact and allowed is not None else None
        # a drafted call's rows must each come out as if fed alone (a prefill's need not)
        rows = EXACT_ROWS if exact and past > 0 else None
        qk_width = (self.heads + self.kv_heads) * self.head_dim
        kept = {}
        for i, (norm1, qkv, out, norm2, gate_up, down) in enumerate(self.layers):
            q_k_v = qkv(norm1(x), rows)
            # transformers' apply_rotary_pos_emb, once over q's and k's heads together
            qk = self._heads(q_k_v[..., :qk_width], n)
            qk = (qk * cos) + (rotate_half(qk) * sin)
            q, k = qk[:, : self.heads], qk[:, self.heads:]
            self.keys[i, :, past:end] = k[0]
            self.values[i, :, past:end] = self._heads(q_k_v[..., qk_width:], n)[0]
            if exact:  # the cache past `end` (finite, masked out) pads the reductions
                span = min(padded_keys(end), self.keys.shape[2])
                att = row_exact_attention(q, self.keys[i, None, :, :span], self.values[i, None, :, :span], allowed,
                                          self.head_dim ** -0.5, valid=end, layout=layout)
            else:
                keys, values = self.keys[i, None, :, :end], self.values[i, None, :, :end]
                att = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, is_causal=causal,
                                                     scale=self.head_dim ** -0.5, enable_gqa=True)
            x = x + out(att.transpose(1, 2).reshape(1, n, -1), rows)
            gate, up = gate_up(norm2(x), rows).chunk(2, -1)
            x = x + down(F.silu(gate) * up, rows)
            if i in layers:
                kept[i] = x[0]
        self.length = end
        return self.body.norm(x)[0], torch.cat([kept[i] for i in layers], -1) if layers else None

    def crop(self, tokens: int) -> None:
        """Forget the last `tokens` cached positions."""
        self.length -= tokens

    def keep(self, past: int, nodes: list[int]) -> None:
        """Keep cached positions past + nodes (ascending) right after `past`, drop the rest."""
        index = torch.tensor(nodes) + past
        self.keys[:, :, past: past + len(nodes)] = self.keys[:, :, index]
        self.values[:, :, past: past + len(nodes)] = self.values[:, :, index]
        self.length = past + len(nodes)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(1, n, -1, self.head_dim).transpose(1, 2)
