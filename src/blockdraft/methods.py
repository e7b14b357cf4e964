"""Decoding methods by name: each is a drafter + refiner pair built from the loaded parts.

Adding a method is one entry in METHODS: a function (Decoder) -> (drafter, refiner).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from .drafting import Drafter, HeadsDrafter, NoDrafter
from .errors import BlockdraftError
from .refine.base import ArgmaxRefiner, Refiner

if TYPE_CHECKING:
    from .api import Decoder

Factory = Callable[["Decoder"], tuple[Drafter, Refiner]]


def _ar(dec: "Decoder") -> tuple[Drafter, Refiner]:
    return NoDrafter(), ArgmaxRefiner()


def _bpd(dec: "Decoder") -> tuple[Drafter, Refiner]:
    return HeadsDrafter(dec.require_heads(), dec.target.lm_head, topk=dec.topk, with_entropy=dec.record), ArgmaxRefiner()


METHODS: dict[str, Factory] = {"ar": _ar, "bpd": _bpd}


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


FAMILIES: list[Callable[[str], Factory | None]] = []  # parsers for names like bpd-ngram-p{P}
FAMILY_HELP: list[str] = []
