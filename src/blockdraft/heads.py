"""Draft heads: the block-draft predictors of blockwise parallel decoding.

Numbering used everywhere in blockdraft: the base model's own output is the paper's "head 1"
and predicts the next token x[t+1] from the hidden state h[t]. Draft head j (j = 1..K,
the paper's head j+1) predicts x[t+1+j] from the same h[t]. Each draft head is one residual
feed-forward block, h + SiLU(W h + b) (Stern et al. 2018; Medusa-1), followed by the base
model's own frozen output projection, so a head adds only H*H + H parameters.

Chained heads (`HeadsConfig.chain`, Hydra-style) also read the tokens before their target:
head j sees [h; e(x[t+1]); ...; e(x[t+j])], where e is the row of the output projection and
x[t+1] is the base model's own next token (already committed when the draft is made). While
drafting, the later tokens are the heads' own guesses, so the heads run one after another
(K small steps, no base-model call); a guess only matters if every earlier one was right, so
teacher forcing trains exactly what verification rewards. On a 90k-position probe, chained
heads kept 0.37 draft tokens per step against 0.25 for the plain ones.

A draft vocabulary (the most frequent answer tokens of the training data, stored with the
heads) restricts that projection when drafting: 16,384 of SmolLM2's 49,152 rows cover 99.3%
of the distilled answer tokens and cost a third of the time. Drafts outside it are simply not
proposed; verification, which always uses the full vocabulary, keeps the output exact.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import BlockdraftError

WEIGHTS_FILE = "heads.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "blockdraft-heads/1"


@dataclass
class HeadsConfig:
    num_heads: int  # K draft heads; head j predicts the token j+1 positions after h[t]
    hidden_size: int  # H of the base model
    vocab_size: int  # V of the base model's output projection
    base_model: str = ""  # the model spec the heads were trained for
    base_fingerprint: str = ""  # models.model_fingerprint of that model
    training: dict = field(default_factory=dict)  # data, tokens, epochs, seed, time, accuracy...
    draft_vocab_size: int = 0  # rows of the projection used when drafting (0: the full vocabulary)
    chain: bool = False  # head j also reads the embeddings of the j tokens before its target


class DraftHeads(nn.Module):
    """K residual SiLU blocks on the last hidden state, sharing the base output projection."""

    def __init__(self, config: HeadsConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        inputs = [h * (1 + j if config.chain else 1) for j in range(1, config.num_heads + 1)]
        self.blocks = nn.ModuleList(nn.Linear(n, h) for n in inputs)
        for block in self.blocks:  # zero-init: every head starts as the base model's next-token guess
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)
        if config.draft_vocab_size:
            self.register_buffer("draft_vocab", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.draft_rows = DraftRows()  # the lm_head rows of draft_vocab, copied on first use

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def forward(self, hidden: torch.Tensor, before: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [..., H] -> head states [..., K, H] (project with the base lm_head for logits).

        Chained heads need `before` [..., K, H]: embeddings of x[t+1..t+K], head j reads the first j.
        """
        dtype = self.blocks[0].weight.dtype
        hidden = hidden.to(dtype)
        if self.config.chain and before is None:
            raise ValueError("chained draft heads need the embeddings of the tokens before each target")
        states = []
        for j, block in enumerate(self.blocks, 1):
            x = torch.cat([hidden, before[..., :j, :].to(dtype).flatten(-2)], -1) if self.config.chain else hidden
            states.append(hidden + nn.functional.silu(block(x)))
        return torch.stack(states, dim=-2)

    def logits(self, hidden: torch.Tensor, lm_head: nn.Module, before_ids: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [..., H] -> draft logits [..., K, V] through the shared frozen projection.

        Chained heads are teacher-forced on `before_ids` [..., K] = x[t+1..t+K] (ids past the end: any).
        """
        before = None if not self.config.chain else embed(lm_head, before_ids)
        states = self(hidden, before).to(lm_head.weight.dtype)
        return lm_head(states)

    def set_draft_vocab(self, ids: torch.Tensor) -> None:
        """Restrict drafting to these token ids (most useful first)."""
        self.config.draft_vocab_size = len(ids)
        self.register_buffer("draft_vocab", torch.as_tensor(ids, dtype=torch.long).to(self.blocks[0].weight.device))
        self.draft_rows.forget()

    @torch.no_grad()
    def draft_logits(self, hidden: torch.Tensor, lm_head: nn.Module, next_token: int | None = None,
                     num_heads: int | None = None, stop_below: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden [H] -> (logits [K', V'] of the first K' heads, token id of each column or None for the full vocabulary).

        Chained heads start from `next_token` (x[t+1]) and feed each head's argmax to the next.
        With `stop_below`, the draft ends before the first head whose argmax chain the heads
        themselves give less than that probability (K' may be 0): chained heads then skip the
        remaining heads' work, and no one verifies tokens that are unlikely to be kept.
        """
        num_heads = min(num_heads or self.num_heads, self.num_heads)
        project, vocab = self._draft_projection(lm_head)
        if not self.config.chain:
            rows = project(self(hidden[None])[0, :num_heads])
            return rows[: _confident_prefix(rows, stop_below)], vocab
        if next_token is None:
            raise ValueError("chained draft heads need the base model's next token")
        dtype, weight = self.blocks[0].weight.dtype, lm_head.weight
        hidden = hidden.to(dtype)
        inputs, rows, chance = [hidden, weight[next_token].to(dtype)], [], 1.0
        for block in self._draft_blocks(lm_head)[:num_heads]:
            state = hidden + nn.functional.silu(block(torch.cat(inputs)[None])[0])
            row = project(state[None])[0]
            if row.dtype.itemsize < 4:  # float32 once: argmax and softmax run 3x faster than on bfloat16
                row = row.float()
            best = int(row.argmax())
            if stop_below:
                chance *= float(top_chance(row))
                if chance < stop_below:
                    break
            rows.append(row)
            inputs.append(weight[best if vocab is None else int(vocab[best])].to(dtype))
        return (torch.stack(rows) if rows else row.new_zeros((0, row.shape[-1]))), vocab

    def _draft_projection(self, lm_head: nn.Module):
        return self.draft_rows.projection(getattr(self, "draft_vocab", None), lm_head, self.blocks[0].weight.dtype)

    def _draft_blocks(self, lm_head: nn.Module) -> list:
        """The blocks as one-row products: packed for oneDNN where the target runs oneDNN linears
        (2.2x faster for the last chained head here, same results), else the modules themselves.
        The packed copies are buffers (counted with the heads' memory), redone when a weight changes."""
        from .cpu import OneDNNLinear, can_pack_dtype, pack_weight, packed_linear

        if not isinstance(lm_head, OneDNNLinear) or not can_pack_dtype(self.blocks[0].weight.dtype):
            return list(self.blocks)
        key = tuple((b.weight.data_ptr(), b.weight._version, b.weight.dtype) for b in self.blocks)
        if getattr(self, "_blocks_of", None) != key:
            self._packed_blocks = []
            for j, block in enumerate(self.blocks):
                packed = pack_weight(block.weight.detach(), 1)
                self.register_buffer(f"draft_block{j}", packed, persistent=False)
                self._packed_blocks.append(lambda x, w=packed, b=block.bias: packed_linear(x, w, b))
            self._blocks_of = key
        return self._packed_blocks

    def check_compatible(self, model: torch.nn.Module, fingerprint: str | None = None) -> None:
        check_sizes(self.config, model, fingerprint)

    def save(self, folder: str | Path, dtype: torch.dtype = torch.float16) -> Path:
        return save_drafter(self, FORMAT, folder, dtype)


class DraftRows(nn.Module):
    """The draft-vocabulary rows of an lm_head in a drafter's dtype (bfloat16 drafting halves the
    memory traffic), packed like lm_head on a CPU: copied once, kept as a buffer of the drafter
    that owns this module (so they count with its memory), copied again when lm_head, its
    weight, the dtype or the layout changes, or after forget()."""

    def __init__(self):
        super().__init__()
        self.register_buffer("rows", None, persistent=False)
        self.source: tuple | None = None  # which lm_head weight, version, dtype and layout `rows` holds

    def forget(self) -> None:
        self.rows, self.source = None, None

    def projection(self, vocab: torch.Tensor | None, lm_head: nn.Module, dtype: torch.dtype):
        """(states [N, H] -> logits [N, V'], the column ids or None): all of lm_head without a draft vocabulary."""
        if vocab is None or not len(vocab):
            return (lambda states: lm_head(states.to(lm_head.weight.dtype))), None
        from .cpu import OneDNNLinear, can_pack_dtype, pack_weight, packed_linear

        weight = lm_head.weight
        packed = isinstance(lm_head, OneDNNLinear) and can_pack_dtype(dtype)  # the model runs oneDNN linears
        source = (id(weight), weight._version, dtype, packed, vocab.data_ptr())
        if self.source != source:  # first call, another lm_head, vocabulary or layout: copy the rows once
            rows = weight.detach()[vocab].to(dtype)  # [V', H]: 4.7 MB for 4,096 SmolLM2 rows in bfloat16
            self.rows, self.source = (pack_weight(rows, 1) if packed else rows), source
        rows = self.rows
        if rows.is_mkldnn:
            return (lambda states: packed_linear(states.to(dtype), rows)), vocab
        return (lambda states: nn.functional.linear(states.to(dtype), rows)), vocab


def save_drafter(module: nn.Module, kind: str, folder: str | Path, dtype: torch.dtype = torch.float16,
                 weights_file: str = WEIGHTS_FILE) -> Path:
    """Write a drafter's safetensors weights (floats in `dtype`) + its JSON config (with `kind`) into `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in module.state_dict().items()}
    save_file(state, str(folder / weights_file), metadata={"format": kind})
    (folder / CONFIG_FILE).write_text(json.dumps({"format": kind, **asdict(module.config)}, indent=2) + "\n")
    return folder


def check_sizes(config, model: torch.nn.Module, fingerprint: str | None = None) -> None:
    """Refuse drafters made for another model: sizes always, weights when both fingerprints exist."""
    got = (getattr(model.config, "hidden_size", None), model.get_output_embeddings().weight.shape[0])
    want = (config.hidden_size, config.vocab_size)
    if got != want:
        raise BlockdraftError(
            f"draft heads were trained for a model with hidden size {want[0]} and vocabulary {want[1]} "
            f"({config.base_model or 'unknown model'}), but this model has {got[0]} and {got[1]}"
        )
    if fingerprint and config.base_fingerprint and fingerprint != config.base_fingerprint:
        raise BlockdraftError(
            f"draft heads were trained for {config.base_model!r} (weights {config.base_fingerprint}), "
            f"not this model (weights {fingerprint}); train heads for it with `blockdraft train-heads`"
        )


def top_chance(logits: torch.Tensor) -> torch.Tensor:
    """The heads' probability of their own argmax, per row of logits [..., V']."""
    return torch.softmax(logits.float(), dim=-1).amax(-1)


def _confident_prefix(rows: torch.Tensor, stop_below: float) -> int:
    """How many leading rows keep the probability of their argmax chain at or above `stop_below`."""
    if not stop_below or not len(rows):
        return len(rows)
    return int((top_chance(rows).cumprod(0) >= stop_below).sum())


def embed(lm_head: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Token ids [...] -> rows of the output projection [..., H]: the chained heads' token features."""
    weight = lm_head.weight
    return weight[ids.clamp(0, weight.shape[0] - 1).to(weight.device)]


def following_ids(ids: list[int], first: int, count: int, k: int, pad: int = 0) -> torch.Tensor:
    """[count, k] ids: row r holds ids[t+1 .. t+k] for t = first + r (`pad` past the end), what chained heads read."""
    padded = torch.tensor(list(ids) + [pad] * (k + 1), dtype=torch.long)
    t = torch.arange(first, first + count)
    return padded[t[:, None] + 1 + torch.arange(k)[None, :]]


def load_heads(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load heads saved by DraftHeads.save; a missing or corrupt checkpoint is a one-line error
    naming the file and the fault (blockdraft.validate)."""
    from . import validate

    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    raw = validate.checkpoint_config(folder, CONFIG_FILE, WEIGHTS_FILE, FORMAT, "draft heads")
    config = validate.config_from(HeadsConfig, raw, folder / CONFIG_FILE, positive=("num_heads", "hidden_size", "vocab_size"),
                                  non_negative=("draft_vocab_size",))
    state = validate.safetensors(folder / WEIGHTS_FILE)
    heads = DraftHeads(config).to(dtype)  # before loading: no round trip through float32
    validate.drafter_state(heads, state, config.vocab_size, folder / WEIGHTS_FILE)
    heads.load_state_dict(state)
    return heads.to(device=device, dtype=dtype).eval().requires_grad_(False)
