"""Decoding methods by name: each is a drafter + refiner pair built from the loaded parts.

Adding a method is one entry in METHODS: a function (Decoder) -> (drafter, refiner).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable

from .drafting import Drafter, FeatureDrafter, HeadsDrafter, NoDrafter
from .feature_head import FeatureHead
from .errors import BlockdraftError
from .refine.base import ArgmaxRefiner, Refiner

if TYPE_CHECKING:
    from .api import Decoder

Factory = Callable[["Decoder"], tuple[Drafter, Refiner]]


def _ar(dec: "Decoder") -> tuple[Drafter, Refiner]:
    return NoDrafter(), ArgmaxRefiner()


def _heads_drafter(dec: "Decoder", topk: int, stop_below: float = 0.0) -> HeadsDrafter | FeatureDrafter:
    """The drafter of the loaded heads: BPD heads, or the context-reading feature head."""
    heads = dec.require_heads()
    kind = FeatureDrafter if isinstance(heads, FeatureHead) else HeadsDrafter
    return kind(heads, dec.target.lm_head, topk=topk, with_entropy=dec.record, stop_below=stop_below)


BPD_STOP = 0.05  # bpd ends a draft where the heads give its chain less chance than this (README: "Adaptive draft size")


def _bpd(dec: "Decoder") -> tuple[Drafter, Refiner]:
    """Blockwise parallel decoding, each block only as long as the heads are confident."""
    return _heads_drafter(dec, dec.topk, BPD_STOP), ArgmaxRefiner()


def _bpd_full(dec: "Decoder") -> tuple[Drafter, Refiner]:
    """The paper's BPD: every head drafts, every step (the highest block efficiency, not the fastest)."""
    return _heads_drafter(dec, dec.topk), ArgmaxRefiner()


def _lookup(dec: "Decoder") -> tuple[Drafter, Refiner]:
    from .lookup import ContextLookup

    return NoDrafter(), ContextLookup()


FAST_PBEST = 4  # drafts per step of the default method before sizing (README: "Choosing a method")


def _fast(dec: "Decoder") -> tuple[Drafter, Refiner]:
    """The default: the best lossless drafts this setup has, sized to this machine's cost curve.

    Heads -> n-gram rescored p-best (the 0-gram baseline without an n-gram LM) -> trimmed to the
    nodes that pay for their forward time -> plus a draft looked up in the context. Without
    heads: the context lookup alone.
    """
    if dec.heads is None:
        return _lookup(dec)
    lm = "ngram" if dec.ngram_path is not None else "0gram"
    return resolve(f"bpd-{lm}-p{FAST_PBEST}-fit-ctx")(dec)


METHODS: dict[str, Factory] = {"ar": _ar, "bpd": _bpd, "bpd-full": _bpd_full, "lookup": _lookup, "fast": _fast}


def resolve(name: str) -> Factory:
    """The factory for a method name, including parameterised families such as bpd-ngram-p16."""
    if name in METHODS:
        return METHODS[name]
    for family in FAMILIES:
        factory = family(name)
        if factory is not None:
            return factory
    raise BlockdraftError(f"unknown method {name!r}; choose one of {', '.join(available())}")


def available() -> list[str]:
    return list(METHODS) + FAMILY_HELP


LATTICE_TOPK = 16  # candidates per head in the refiners' lattice (the paper's k)


def _pbest_family(name: str) -> Factory | None:
    """bpd-ngram, bpd-ngram-p{P} (n-gram rescored p-best) and bpd-0gram-p{P} (head scores only)."""
    from .refine.lattice import PBestRefiner

    m = re.fullmatch(r"bpd-(ngram|0gram)(?:-p(\d+))?", name)
    if m is None or (m.group(1) == "0gram" and m.group(2) is None):
        return None
    p = int(m.group(2) or 1)

    def build(dec: "Decoder") -> tuple[Drafter, Refiner]:
        drafter = _heads_drafter(dec, LATTICE_TOPK)
        if m.group(1) == "0gram":
            return drafter, PBestRefiner(None, 0.0, p)
        lm = dec.ngram()
        return drafter, PBestRefiner(lm, pick_alpha(lm.meta.get("alpha", {}), dec.category), p)

    return build


def _neural_family(name: str) -> Factory | None:
    from .refine.neural import NeuralRefiner

    if name != "bpd-neural":
        return None

    def build(dec: "Decoder") -> tuple[Drafter, Refiner]:
        rescorer = dec.rescorer()
        return _heads_drafter(dec, LATTICE_TOPK), NeuralRefiner(rescorer, pick_alpha(rescorer.alpha, dec.category))

    return build


def pick_alpha(table: dict, category: str | None) -> float:
    """The tuned alpha for a benchmark category (via its training domain), else the default."""
    domain = CATEGORY_DOMAIN.get(category or "", category)
    return float(table.get(domain, table.get("default", 1.0)))


# Spec-Bench categories -> the training-prompt domain whose held-out prompts tuned alpha.
CATEGORY_DOMAIN = {"writing": "writing", "roleplay": "roleplay", "reasoning": "chat", "math": "math",
                   "coding": "coding", "extraction": "rag", "stem": "qa", "humanities": "chat",
                   "translation": "translation", "summarization": "summarization", "qa": "qa",
                   "math_reasoning": "math", "rag": "rag"}


def _suffix_family(suffix: str, wrap: Callable[["Decoder", Drafter, Refiner], tuple[Drafter, Refiner]]):
    """A family `{method}{suffix}`: the inner method's drafter and refiner, passed through `wrap`."""

    def family(name: str) -> Factory | None:
        if not name.endswith(suffix):
            return None
        inner = resolve(name[: -len(suffix)])
        return lambda dec: wrap(dec, *inner(dec))

    return family


# Sized drafts skip the heads past this chance of the argmax chain (the likeliest path under the
# head scores): no node that unlikely pays for its forward time here (cost(2)/cost(1) ~ 1.1).
FIT_STOP = 0.02


def _fitted(dec: "Decoder", drafter: Drafter, refiner: Refiner) -> tuple[Drafter, Refiner]:
    """{method}-fit: any heads method with its drafts sized to the measured cost curve."""
    from .sizing import FittedRefiner

    if isinstance(drafter, (HeadsDrafter, FeatureDrafter)):
        drafter.topk = max(drafter.topk, 4)  # probabilities of the drafted tokens
        drafter.stop_below = max(drafter.stop_below, FIT_STOP)
    return drafter, FittedRefiner(refiner, dec.cost_curve())


def _with_context(dec: "Decoder", drafter: Drafter, refiner: Refiner) -> tuple[Drafter, Refiner]:
    """{method}-ctx: any method's drafts plus a draft looked up in the context (blockdraft.lookup)."""
    from .lookup import ContextLookup

    return drafter, ContextLookup(refiner)


FAMILIES: list[Callable[[str], Factory | None]] = [_pbest_family, _neural_family, _suffix_family("-ctx", _with_context),
                                                   _suffix_family("-fit", _fitted)]
FAMILY_HELP: list[str] = ["bpd-ngram", "bpd-ngram-p{P}", "bpd-0gram-p{P}", "bpd-neural", "{method}-fit", "{method}-ctx"]
