"""Test helpers: tiny random-weight models and drafters that force chosen verification paths.

Importable by users who want to test their own drafters against the losslessness contract.
"""
from __future__ import annotations

import math

import torch

from .heads import DraftHeads, HeadsConfig
from .drafting import ReadsLastHidden
from .rope import RopeTable
from .types import Lattice


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float64, vocab: int = 64, hidden: int = 32,
               layers: int = 2, max_positions: int = 256, heads: tuple[int, int] = (4, 2)):
    """A random-weight Llama-architecture CausalLM built from a config (never downloaded);
    `heads`: query heads, key/value heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads[0], num_key_value_heads=heads[1], max_position_embeddings=max_positions,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # larger weights than the default init: less flat, more varied greedy text
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.requires_grad_(False)


def transformers_reads_rope_table(model) -> None:
    """Make transformers' rotary module in `model` return the fast path's table rows
    (blockdraft.rope) instead of its per-call cos and sin, so that transformers' forward and the
    fast path do the same arithmetic and can be compared bit for bit."""
    rotary = model.get_decoder().rotary_emb
    table = RopeTable(rotary)
    rotary.forward = lambda x, position_ids: tuple(t[0] for t in table(position_ids[0], x.dtype))


def random_heads(model, num_heads: int, seed: int = 0, chain: bool = False) -> DraftHeads:
    """Heads with random (not zero) weights, matching the model's sizes."""
    torch.manual_seed(seed)
    cfg = HeadsConfig(num_heads=num_heads, hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size,
                      chain=chain)
    heads = DraftHeads(cfg).to(next(model.parameters()).dtype)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.5)
    return heads.eval()


def reference_greedy(model, prompt: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Greedy decoding the slow, obvious way: a full forward over the whole sequence per token."""
    ids, out = list(prompt), []
    for _ in range(max_new_tokens):
        token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        out.append(token)
        if token in stop_ids:
            break
    return out


class FixedDepthDrafter(ReadsLastHidden):
    """Returns an empty K-row lattice so that a scripted refiner is consulted every step."""

    def __init__(self, depth: int):
        self.depth = depth

    def propose(self, hidden: torch.Tensor, context: list[int]) -> Lattice:
        return Lattice(tokens=torch.zeros(self.depth, 1, dtype=torch.long), logprobs=torch.zeros(self.depth, 1))


class ScriptedRefiner:
    """Drafts derived from the known greedy answer, to force any acceptance pattern.

    `wrong_at` per draft: the first draft position that is corrupted (None: fully right, 0: all
    wrong). Corrupted tokens are (right + 1) % vocab, so they never match.
    """

    def __init__(self, prompt_len: int, answer: list[int], depth: int, vocab: int,
                 wrong_at: list[int | None] = (None,)):
        self.prompt_len, self.answer, self.depth, self.vocab = prompt_len, answer, depth, vocab
        self.wrong_at = list(wrong_at)

    def accept(self, context: list[int]) -> None:
        pass

    def refine(self, lattice: Lattice, context: list[int]) -> list[list[int]]:
        done = len(context) - self.prompt_len
        truth = (self.answer[done:done + self.depth] + [0] * self.depth)[: self.depth]
        drafts = []
        for wrong in self.wrong_at:
            cut = self.depth if wrong is None else wrong
            drafts.append(truth[:cut] + [(t + 1) % self.vocab for t in truth[cut:]])
        return drafts


TINY_WORDS = (
    "the a an is are was be to of and or in on at for with by from it this that what how why who when "
    "which write explain name give three two one rivers sky blue story poem email answer question text "
    "translate summarize code list short about please make user assistant now"
).split()


def tiny_tokenizer(vocab: int = 64):
    """A word-level chat tokenizer over `vocab` ids (specials included), built offline, so tests
    can run the chat template, multi-turn encoding and decoding without downloading anything."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|im_start|>", "<|im_end|>", "<unk>"]
    words = specials + TINY_WORDS + [".", ",", "?", "!", ":"]
    words += [f"w{i}" for i in range(vocab - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words[:vocab])}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # join words with spaces
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>", pad_token="<|im_end|>", chat_template=template)
    fast.add_special_tokens({"additional_special_tokens": specials[:2]})
    return fast


def tiny_decoder(seed: int = 0, num_heads: int = 3):
    """A Decoder around a tiny random Llama, random heads and the tiny tokenizer."""
    from .api import Decoder
    from .models import LoadedModel

    model = tiny_llama(seed)
    return Decoder(LoadedModel(model, tiny_tokenizer(model.config.vocab_size), "tiny"),
                   random_heads(model, num_heads, seed), None)


def chi_square_pvalue(counts: dict, probs: dict, min_expected: float = 5.0) -> tuple[float, int, float]:
    """Pearson's goodness-of-fit test of observed `counts` against the exact `probs` (same keys).

    Cells expected fewer than `min_expected` times are pooled into one cell (the chi-square
    approximation needs about 5 per cell). Returns (statistic, degrees of freedom, p-value); a
    correct sampler gets a p-value below alpha with probability alpha.
    """
    n = sum(counts.values())
    if any(c and not probs.get(k, 0.0) for k, c in counts.items()):
        return math.inf, 1, 0.0  # an outcome the target never produces
    big = [k for k, p in probs.items() if p * n >= min_expected]
    observed = [counts.get(k, 0) for k in big]
    expected = [probs[k] * n for k in big]
    rest = n - sum(observed), n - sum(expected)
    if rest[1] > 1e-9 * n:
        observed.append(rest[0])
        expected.append(rest[1])
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    df = max(len(observed) - 1, 1)
    pvalue = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                           torch.tensor(stat / 2, dtype=torch.float64)))
    return stat, df, pvalue


def total_variation(counts: dict, probs: dict) -> float:
    """Half the L1 distance between the empirical distribution of `counts` and `probs`."""
    n = sum(counts.values())
    return 0.5 * sum(abs(counts.get(k, 0) / n - probs.get(k, 0.0)) for k in set(counts) | set(probs))
