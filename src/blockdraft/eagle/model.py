"""The `eagle` draft model (EAGLE-3 style, Li et al. 2025): one decoder layer over fused target features.

Why: the BPD heads read only the last hidden state and stall near 43% on the second token. This
layer reads a low, a middle and a high layer of the target (fused by `fc`), the token that
follows each position, and, through its own KV cache, every committed position; it drafts
autoregressively, feeding its own output back as the next position's feature, and it is
trained that way (training-time test, blockdraft.train.eagle).

At position s its input is [norm(e(x[s+1])); norm(g[s])], where g[s] = fc(target features at s)
for committed positions and the layer's own previous output for drafted ones; its output
predicts x[s+2] over a reduced draft vocabulary (`d2t`: draft id -> target id offset, the
layout vLLM and SGLang read). The embedding is the target's own (not stored here).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BlockdraftError

FORMAT = "blockdraft-eagle/1"
WEIGHTS_FILE = "eagle.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class EagleConfig:
    hidden_size: int  # H of the target
    vocab_size: int  # V of the target
    target_layers: list[int]  # decoder layers whose outputs are fused (low, middle, high)
    draft_vocab_size: int  # V' of the draft's own output projection
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    intermediate_size: int = 1536
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    # RMSNorm each target layer's output before fc: SmolLM2's middle and high layers carry
    # activations up to ~25,000 at a few positions and RMS 3-23 elsewhere; raw, fc trains poorly
    fc_norm: bool = False
    # instead, one RMSNorm over all fused features together (EAGLE-3.1's `norm_before_fc`): the
    # only feature norm llama.cpp's EAGLE-3 graph has
    norm_before_fc: bool = False
    # median RMS of each fused layer's features over the training data: what turns the per-layer
    # norms into one (one_feature_norm) for llama.cpp
    feature_rms: list[float] = field(default_factory=list)
    base_model: str = ""
    base_fingerprint: str = ""
    training: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def default_layers(num_layers: int) -> list[int]:
    """Low, middle and high decoder layers (the speculators/vLLM choice), all before the last."""
    if num_layers >= 8:
        return [1, num_layers // 2 - 1, num_layers - 4]
    return list(range(max(0, num_layers - 4), num_layers - 1))  # small test models: the last three before the last


class EagleLayer(nn.Module):
    """fc, one pre-norm decoder layer with a 2H-wide attention input, a final norm and lm_head."""

    def __init__(self, config: EagleConfig):
        super().__init__()
        self.config = config
        h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
        nh, nkv = config.num_attention_heads, config.num_key_value_heads
        self.fc = nn.Linear(len(config.target_layers) * h, h, bias=False)
        self.fc_norm = nn.ModuleList(nn.RMSNorm(h, eps=config.rms_norm_eps) for _ in config.target_layers) \
            if config.fc_norm else None
        self.input_norm = nn.RMSNorm(len(config.target_layers) * h, eps=config.rms_norm_eps) \
            if config.norm_before_fc else None
        self.input_layernorm = nn.RMSNorm(h, eps=config.rms_norm_eps)
        self.hidden_norm = nn.RMSNorm(h, eps=config.rms_norm_eps)
        self.q_proj = nn.Linear(2 * h, nh * d, bias=False)
        self.k_proj = nn.Linear(2 * h, nkv * d, bias=False)
        self.v_proj = nn.Linear(2 * h, nkv * d, bias=False)
        self.qkv: nn.Linear | None = None  # q|k|v as one product, for drafting (fuse_qkv)
        self.o_proj = nn.Linear(nh * d, h, bias=False)
        self.post_attention_layernorm = nn.RMSNorm(h, eps=config.rms_norm_eps)
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.norm = nn.RMSNorm(h, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        # a plain float32 tensor, not a buffer: module.to(bfloat16) must not round the rotary frequencies
        self._inv_freq = config.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """Target features [..., len(layers) * H] -> g [..., H]."""
        if self.fc_norm is not None:  # in float32: the outliers' squares overflow nothing there
            chunks = features.float().chunk(len(self.fc_norm), -1)
            features = torch.cat([F.rms_norm(c, (c.shape[-1],), n.weight.float(), n.eps) for n, c in zip(self.fc_norm, chunks)], -1)
        elif self.input_norm is not None:
            n = self.input_norm
            features = F.rms_norm(features.float(), (features.shape[-1],), n.weight.float(), n.eps)
        return self.fc(features.to(self.fc.weight.dtype))

    def forward(self, g: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None, allowed: torch.Tensor | None,
                into: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """g, embeds [B, T, H] at `positions` [T] -> output [B, T, H] and this call's keys, values
        [B, KV, T, D]. Queries attend to `past` (keys, values [B, KV, P, D]) then to this call's
        keys, as `allowed` [T, P + T] says (None: causal over past + these).

        into: instead of `past`, views (keys, values) [B, KV, P + T, D] of a cache whose first P
        places hold the past: this call's keys and values are written into the last T, and the
        past is read where it lies (drafting; `past` concatenates, a copy of the past per call)."""
        b, t, _ = g.shape
        c = self.config
        heads, kv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        x = torch.cat([self.input_layernorm(embeds.to(g.dtype)), self.hidden_norm(g)], -1)
        if self.qkv is not None:
            qk, v = self.qkv(x).split(((heads + kv) * d, kv * d), -1)
        else:
            qk, v = torch.cat([self.q_proj(x), self.k_proj(x)], -1), self.v_proj(x)
        # q's and k's heads rotated together: one pass of the rotary arithmetic instead of two
        qk = _rotate(qk.view(b, t, heads + kv, d).transpose(1, 2), *self._rotary(positions, x.device))
        q, k = qk[:, :heads], qk[:, heads:]
        v = v.view(b, t, kv, d).transpose(1, 2)
        if into is not None:
            keys, values = into
            keys[:, :, -t:], values[:, :, -t:] = k, v
        else:
            keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        earlier = keys.shape[2] - t
        causal = allowed is None and earlier == 0 and t > 1
        if allowed is None and earlier > 0 and t > 1:
            allowed = torch.ones(t, keys.shape[2], dtype=torch.bool, device=g.device).tril(earlier)
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, is_causal=causal, enable_gqa=True)
        h = g + self.o_proj(a.transpose(1, 2).reshape(b, t, -1))
        m = self.post_attention_layernorm(h)
        return h + self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m)), k, v

    def fuse_qkv(self) -> None:
        """Draft with q, k and v as one product over their stacked rows (`qkv`) instead of three.
        For drafting only: the three projections are dropped, so such a layer is neither trained
        nor saved (save_eagle refuses it). Measured together with forward's rotating q and k in
        one pass: SmolLM2's drafting 6.19 -> 5.88 ms a step (bfloat16, oneDNN-packed, 2-core
        Xeon), the same drafts."""
        if self.qkv is not None:
            return
        parts = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([p.weight.detach() for p in parts])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(weight)
        self.qkv = fused.requires_grad_(False)
        del self.q_proj, self.k_proj, self.v_proj

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """Output [..., H] -> draft-vocabulary logits [..., V']."""
        return self.lm_head(self.norm(out))

    def target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def _rotary(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, D] of the rotary angles at `positions`, in float32."""
        if self._inv_freq.device != device:
            self._inv_freq = self._inv_freq.to(device)
        angles = positions.to(device=device, dtype=torch.float32)[:, None] * self._inv_freq[None]  # [T, D/2]
        angles = torch.cat([angles, angles], -1)
        return angles.cos(), angles.sin()

    def check_compatible(self, model: nn.Module, fingerprint: str | None = None) -> None:
        """One line when these weights were trained for another model."""
        cfg, c = model.config, self.config
        if (c.hidden_size, c.vocab_size) != (cfg.hidden_size, model.get_output_embeddings().weight.shape[0]):
            raise BlockdraftError(f"this eagle drafter was trained for hidden size {c.hidden_size} and vocabulary "
                                  f"{c.vocab_size}, the model has {cfg.hidden_size} and {cfg.vocab_size}")
        if max(c.target_layers) >= cfg.num_hidden_layers - 1:
            raise BlockdraftError(f"this eagle drafter reads layer {max(c.target_layers)}, the model has "
                                  f"{cfg.num_hidden_layers} (the last one is not read)")
        if fingerprint and c.base_fingerprint and fingerprint != c.base_fingerprint:
            raise BlockdraftError(f"this eagle drafter was trained for {c.base_model or 'another model'} "
                                  f"(fingerprint {c.base_fingerprint}), not these weights ({fingerprint})")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [..., T, D] (half-split layout), computed in float32."""
    x1, x2 = x.chunk(2, -1)
    rotated = torch.cat([-x2, x1], -1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def median_feature_rms(features: torch.Tensor, parts: int) -> list[float]:
    """Median over positions of each part's RMS, for features [N, parts * H]."""
    chunks = features.float().chunk(parts, -1)
    return [round(float(c.pow(2).mean(-1).sqrt().median()), 4) for c in chunks]


def one_feature_norm(layer: EagleLayer) -> EagleLayer:
    """A copy of a per-layer-norm layer (fc_norm) with one RMSNorm over all fused features
    (norm_before_fc): the only feature norm llama.cpp's EAGLE-3 graph has.

    norm(x)_i = x_i / rms(x) * u_i equals the per-layer x_i / rms(x_i) * w_i where each layer's
    RMS stands to the whole's as the medians recorded at training do: u_i = w_i * rms / rms_i.
    Elsewhere it is an approximation; measured, it costs little block efficiency (docs/research.md).
    """
    c = layer.config
    if not c.fc_norm:
        raise BlockdraftError("this eagle drafter has no per-layer feature norms to merge"
                              + (" (it already has one norm over all features)" if c.norm_before_fc else ""))
    if len(c.feature_rms) != len(c.target_layers):
        raise BlockdraftError("this eagle drafter does not record its features' RMS (feature_rms), which merging "
                              "its norms needs: train it again (train-eagle --init) with this version")
    rms = torch.tensor(c.feature_rms, dtype=torch.float32)
    whole = rms.pow(2).mean().sqrt()
    merged = EagleLayer(replace(c, fc_norm=False, norm_before_fc=True))
    state = {k: v.float() if v.is_floating_point() else v for k, v in layer.state_dict().items()
             if not k.startswith("fc_norm.")}
    state["input_norm.weight"] = torch.cat([n.weight.detach().float() * (whole / r) for n, r in zip(layer.fc_norm, rms)])
    merged.load_state_dict(state)
    return merged.to(layer.fc.weight.dtype).eval()


def draft_vocabulary(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` most frequent target ids (ascending) -> d2t offsets: target id = draft id + d2t."""
    ids = torch.sort(torch.topk(counts.float(), min(size, len(counts))).indices).values
    return ids - torch.arange(len(ids))


def random_eagle(model: nn.Module, seed: int = 0, draft_vocab: int | None = None, fc_norm: bool = True,
                 norm_before_fc: bool = False) -> EagleLayer:
    """An eagle layer with random weights for `model`'s sizes (tests): drafts vary with the context
    (norm_before_fc: llama.cpp's one norm over all features, in place of fc_norm's one per layer)."""
    torch.manual_seed(seed)
    cfg = model.config
    v = cfg.vocab_size
    config = EagleConfig(hidden_size=cfg.hidden_size, vocab_size=v, target_layers=default_layers(cfg.num_hidden_layers),
                         draft_vocab_size=draft_vocab or v, fc_norm=fc_norm and not norm_before_fc,
                         norm_before_fc=norm_before_fc, num_attention_heads=cfg.num_attention_heads,
                         num_key_value_heads=cfg.num_key_value_heads, intermediate_size=2 * cfg.hidden_size)
    layer = EagleLayer(config).to(next(model.parameters()).dtype)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 / p.shape[-1] ** 0.5)
        layer.d2t.copy_(draft_vocabulary(torch.randperm(v), config.draft_vocab_size))
    return layer.eval()


def save_eagle(layer: EagleLayer, folder: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    from ..heads import save_drafter

    if layer.qkv is not None:
        raise ValueError("this eagle layer was fused for drafting (fuse_qkv); save the layer it was loaded from")

    return save_drafter(layer, FORMAT, folder, dtype, weights_file=WEIGHTS_FILE)


def load_eagle(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> EagleLayer:
    """An eagle layer saved by save_eagle; a missing or corrupt checkpoint is one line naming the file."""
    from .. import validate

    folder = Path(folder)
    raw = validate.checkpoint_config(folder, CONFIG_FILE, WEIGHTS_FILE, FORMAT, "eagle drafter")
    config = validate.config_from(EagleConfig, raw, folder / CONFIG_FILE, positive=(
        "hidden_size", "vocab_size", "draft_vocab_size", "num_attention_heads", "num_key_value_heads", "intermediate_size"))
    layers = config.target_layers
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        raise validate.fault(folder / CONFIG_FILE, f"target_layers must be layer numbers, found {layers!r}"[:120])
    c = config
    if c.hidden_size % c.num_attention_heads or c.head_dim % 2 or c.num_attention_heads % c.num_key_value_heads:
        raise validate.fault(folder / CONFIG_FILE, f"hidden_size {c.hidden_size} does not split into "
                                                   f"{c.num_attention_heads} attention heads over {c.num_key_value_heads} key/value heads")
    rms = c.feature_rms
    if not isinstance(rms, list) or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in rms):
        raise validate.fault(folder / CONFIG_FILE, f"feature_rms must be positive numbers, found {rms!r}"[:120])
    if c.fc_norm and c.norm_before_fc:
        raise validate.fault(folder / CONFIG_FILE, "fc_norm and norm_before_fc exclude each other (one feature norm)")
    if c.draft_vocab_size > c.vocab_size:
        raise validate.fault(folder / CONFIG_FILE, f"draft_vocab_size {c.draft_vocab_size} exceeds vocab_size {c.vocab_size}")
    state = validate.safetensors(folder / WEIGHTS_FILE)
    layer = EagleLayer(config).to(dtype)
    validate.matching_state(layer, state, folder / WEIGHTS_FILE)
    validate.finite(state.items(), folder / WEIGHTS_FILE)
    d2t = state["d2t"]
    if d2t.is_floating_point() or d2t.dtype == torch.bool:
        raise validate.fault(folder / WEIGHTS_FILE, f"d2t must hold integer offsets, found {d2t.dtype}")
    validate.ids_in_range(d2t.long() + torch.arange(len(d2t)), c.vocab_size, folder / WEIGHTS_FILE, "d2t")
    layer.load_state_dict(state)
    return layer.to(device=device, dtype=dtype).eval().requires_grad_(False)
