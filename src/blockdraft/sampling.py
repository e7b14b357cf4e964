"""Sampling settings and the target's sampling distribution: temperature, then top-k, then top-p.

The distribution is the one transformers' `generate(do_sample=True)` samples from: its own
TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper, in that order, on logits in at
least float32, then a softmax. Using transformers' warpers (not a copy of them) keeps their
exact tie rules: top-k keeps every token tied with the k-th; top-p keeps the smallest set of
best tokens whose mass reaches p, and at least one token.

temperature 0 means greedy decoding (the argmax; top-k, top-p and the seed are then unused).
Randomness is fixed per output position (`PositionNoise`, seeded by `seed` and the position):
the token at position i is a function of the distribution there and of (seed, i) only, so one
seed gives one output for every method and draft shape (at one dtype), and no process-wide
random state is touched.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np
import torch

from .errors import BlockdraftError


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. The defaults are greedy decoding."""

    temperature: float = 0.0  # 0: greedy; > 0: sample from softmax(logits / temperature)
    top_k: int = 0  # keep the k most likely tokens (ties with the k-th included); 0: all
    top_p: float = 1.0  # keep the smallest set of most likely tokens with this much mass; 1: all
    seed: int | None = None  # None: a fresh seed per request (reported in DecodeResult.seed)

    def __post_init__(self) -> None:
        _check(self.temperature, self.top_k, self.top_p, self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def warpers(self):
        """transformers' logits processors for these settings, in generate's order."""
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        warpers = LogitsProcessorList()
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(float(self.temperature)))
        if self.top_k:
            warpers.append(TopKLogitsWarper(int(self.top_k)))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(float(self.top_p)))
        return warpers

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The sampling distribution [N, V] for logits [N, V], on the CPU (where the generator is)."""
        if self.greedy:
            raise ValueError("greedy decoding has no sampling distribution; take the argmax")
        scores = logits.to(torch.promote_types(logits.dtype, torch.float32))
        scores = self.warpers()(None, scores)
        return torch.softmax(scores, dim=-1).cpu()

    def noise(self) -> "PositionNoise":
        """The noise of one request: seeded by `seed`, or by a fresh seed from the OS (its `seed`
        is then a valid `seed` that repeats the output)."""
        return PositionNoise(secrets.randbits(63) if self.seed is None else self.seed)


class PositionNoise:
    """Exponential noise fixed per (seed, output position): the exponential race (Gumbel-max).

    The token at output position i is argmax_v p_i(v) / E_i(v) with E_i(v) ~ Exp(1) i.i.d.:
    an exact draw from p_i (v wins with probability p_i(v)) that reads nothing but p_i and
    (seed, i). A draft tree verified against these choices therefore commits the very tokens
    plain sampling commits with the same seed, whatever was drafted, and the noise of a position
    a step looked past is the same when a later step reaches it. Example: p = [0, 1, 0] gives 1.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def exponentials(self, position: int, vocab: int) -> torch.Tensor:
        """E_position ([vocab] float64): a stream of its own per (seed, position)."""
        stream = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, position])))
        return torch.from_numpy(stream.standard_exponential(vocab))

    def choose(self, probs: torch.Tensor, position: int) -> int:
        """The sampled token at output `position` for the distribution `probs` ([V])."""
        return int((probs.double() / self.exponentials(position, probs.shape[-1])).argmax())


def parse_sampling(temperature: object = 0.0, top_k: object = 0, top_p: object = 1.0,
                   seed: object = None) -> Sampling:
    """Sampling from user values (command-line strings or JSON numbers); a bad one is one BlockdraftError line."""
    return Sampling(_real("temperature", temperature), _integer("top-k", top_k), _real("top-p", top_p),
                    None if seed is None else _integer("seed", seed))


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BlockdraftError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise BlockdraftError(f"{name} must be a number, got {value!r}") from None


def _integer(name: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise BlockdraftError(f"{name} must be an integer, got {value!r}")


def _check(temperature: float, top_k: int, top_p: float, seed: int | None) -> None:
    """One line per bad value: the rules transformers' warpers enforce, plus finite numbers."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise BlockdraftError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise BlockdraftError(f"top-k must be an integer >= 0 (0: no top-k), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not (0 < top_p <= 1):
        raise BlockdraftError(f"top-p must be in (0, 1] (1: no top-p), got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise BlockdraftError(f"seed must be an integer in [0, 2^63), got {seed!r}")


def add_arguments(parser) -> None:
    """--temperature, --top-k, --top-p and --seed on a command (read as text: parse_sampling checks them)."""
    parser.add_argument("--temperature", default="0", help="0 (default): greedy; > 0: sample, exactly as the model would")
    parser.add_argument("--top-k", default="0", help="sample from the k most likely tokens only (0, default: all)")
    parser.add_argument("--top-p", default="1", help="sample from the most likely tokens holding this much mass (1, default: all)")
    parser.add_argument("--seed", default=None, help="seed of the sampler: one seed, one output (default: a fresh one)")


def from_arguments(args) -> Sampling:
    """The Sampling of parsed --temperature/--top-k/--top-p/--seed arguments."""
    return parse_sampling(args.temperature, args.top_k, args.top_p, args.seed)
