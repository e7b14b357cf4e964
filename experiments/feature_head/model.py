"""A draft head that reads the context: one small transformer layer over the base model's
hidden states (EAGLE-style feature-level drafting, Li et al. 2024).

Why: the BPD heads (heads.py) see only the last hidden state h[t], and on Spec-Bench they
keep far fewer tokens than on their held-out data (docs/research.md, "A context-reading feature head"). This head attends over
the hidden states of every committed answer position, kept in its own small KV cache, so it
can follow what the answer has done so far. Input at position s: [h[s]; e(x[s+1])] (e = the
base model's output-projection row, tied to its embedding in SmolLM2); output: a guess of
h[s+1], which the base model's own frozen projection turns into a guess of x[s+2]. Drafting
feeds the guess and its argmax token back in, one position at a time, so a block of K tokens
costs K tiny layer calls and no base-model call. Positions count from the last prompt token
(0), as in training, whose data are the answer positions the distillation cached.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from blockdraft.errors import BlockdraftError
from blockdraft.heads import DraftRows, check_sizes, save_drafter

FORMAT = "blockdraft-feature-head/1"
WEIGHTS_FILE = "heads.safetensors"
CONFIG_FILE = "config.json"

KVCache = tuple[torch.Tensor, torch.Tensor]  # keys, values [1, heads, positions, head_dim]


@dataclass
class FeatureHeadConfig:
    num_heads: int  # K: draft tokens per block (the name matches HeadsConfig: one token per "head")
    hidden_size: int  # H of the base model
    vocab_size: int  # V of the base model's output projection
    attention_heads: int = 9
    intermediate_size: int = 1536
    rope_theta: float = 10000.0
    base_model: str = ""
    base_fingerprint: str = ""
    training: dict = field(default_factory=dict)
    draft_vocab_size: int = 0  # rows of the projection used when drafting (0: the full vocabulary)
    prompt_context: bool = False  # positions start at the first prompt token, which reads e(x[s]) for h[s]


class FeatureHead(nn.Module):
    """fc([h; e]) -> pre-norm attention + SwiGLU block -> predicted next hidden state."""

    def __init__(self, config: FeatureHeadConfig):
        super().__init__()
        self.config = config
        h, i = config.hidden_size, config.intermediate_size
        self.fc = nn.Linear(2 * h, h)
        self.attn_norm, self.mlp_norm = nn.RMSNorm(h, eps=1e-5), nn.RMSNorm(h, eps=1e-5)
        self.qkv, self.out = nn.Linear(h, 3 * h, bias=False), nn.Linear(h, h, bias=False)
        self.gate_up, self.down = nn.Linear(h, 2 * i, bias=False), nn.Linear(i, h, bias=False)
        self.register_buffer("draft_vocab", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.draft_rows = DraftRows()  # the lm_head rows of draft_vocab, copied on first use
        dim = h // config.attention_heads  # rotary frequencies, computed once (drafting calls the layer per token)
        self._inv_freq = config.rope_theta ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        with torch.no_grad():  # start as the identity on h: the block's residual branches begin at zero
            self.fc.weight.zero_()
            self.fc.weight[:, :h].copy_(torch.eye(h))
            self.fc.bias.zero_()
            self.out.weight.zero_()
            self.down.weight.zero_()

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def forward(self, hidden: torch.Tensor, embeds: torch.Tensor, start: int = 0, past: KVCache | None = None
                ) -> tuple[torch.Tensor, KVCache]:
        """hidden, embeds [B, T, H] at positions start..start+T-1 (after `past`) -> features [B, T, H], cache."""
        dtype = self.fc.weight.dtype
        x = self.fc(torch.cat([hidden.to(dtype), embeds.to(dtype)], -1))
        b, t, h = x.shape
        nh = self.config.attention_heads
        q, k, v = self.qkv(self.attn_norm(x.to(dtype))).view(b, t, 3, nh, h // nh).permute(2, 0, 3, 1, 4)
        cos, sin = self._rope(start, t, x.device)
        q, k = _rotate(q, cos, sin).to(dtype), _rotate(k, cos, sin).to(dtype)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        mask = None if past is None else torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - t)
        a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=past is None and t > 1)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, h))
        gate, up = self.gate_up(self.mlp_norm(x.to(dtype))).chunk(2, -1)
        return x + self.down(nn.functional.silu(gate) * up), (k, v)

    def _rope(self, start: int, t: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inv_freq.device != device:  # a plain float32 tensor: module.to(dtype) must not round it
            self._inv_freq = self._inv_freq.to(device)
        angles = torch.arange(start, start + t, device=device, dtype=torch.float32)[:, None] * self._inv_freq[None]
        return angles.cos(), angles.sin()

    def set_draft_vocab(self, ids: torch.Tensor) -> None:
        self.config.draft_vocab_size = len(ids)
        self.draft_vocab = torch.as_tensor(ids, dtype=torch.long, device=self.fc.weight.device)
        self.draft_rows.forget()

    def check_compatible(self, model: nn.Module, fingerprint: str | None = None) -> None:
        check_sizes(self.config, model, fingerprint)

    def save(self, folder: str | Path, dtype: torch.dtype = torch.float16) -> Path:
        return save_drafter(self, FORMAT, folder, dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding on [..., T, D] (pairs are the two halves of D)."""
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def load_feature_head(folder: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> FeatureHead:
    """A FeatureHead saved by FeatureHead.save, checked by blockdraft.validate: field types, sizes
    the layers can take, layout, finite weights, ids."""
    from blockdraft import validate

    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.exists() or not (folder / WEIGHTS_FILE).exists():
        raise BlockdraftError(f"no feature head at {folder}: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
    raw = validate.json_object(path)
    if raw.pop("format", None) != FORMAT:
        raise validate.fault(path, f"not a feature head (format {FORMAT!r} expected)")
    config = validate.config_from(FeatureHeadConfig, raw, path, non_negative=("draft_vocab_size",),
                                  positive=("num_heads", "hidden_size", "vocab_size", "attention_heads", "intermediate_size"))
    if config.hidden_size % config.attention_heads or (config.hidden_size // config.attention_heads) % 2:
        raise validate.fault(path, f"hidden_size {config.hidden_size} does not split into {config.attention_heads} "
                                   "attention heads of an even size")
    state = validate.safetensors(folder / WEIGHTS_FILE)
    head = FeatureHead(config).to(dtype)
    validate.drafter_state(head, state, config.vocab_size, folder / WEIGHTS_FILE)
    head.load_state_dict(state)
    return head.to(device=device, dtype=dtype).eval().requires_grad_(False)


def random_feature_head(model: nn.Module, num_heads: int, seed: int = 0, prompt_context: bool = False) -> FeatureHead:
    """A feature head with random weights (residual branches included), matching the model's sizes (tests)."""
    torch.manual_seed(seed)
    h = model.config.hidden_size
    cfg = FeatureHeadConfig(num_heads=num_heads, hidden_size=h, vocab_size=model.config.vocab_size,
                            attention_heads=4, intermediate_size=2 * h, prompt_context=prompt_context)
    head = FeatureHead(cfg).to(next(model.parameters()).dtype)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.5 / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.5)
            if p.dim() == 2 and p.shape[-1] == 2 * h:  # fc: keep h dominant so drafts vary with the context
                p[:, :h] += torch.eye(h, dtype=p.dtype)
    return head.eval()
