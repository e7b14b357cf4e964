"""The refiner protocol and the identity refiner (plain BPD: the argmax of every head)."""
from __future__ import annotations

from typing import Protocol

from ..types import DraftTree, Lattice


class Refiner(Protocol):
    def refine(self, lattice: Lattice | DraftTree | None, context: list[int]) -> list[list[int]]:
        """Drafts, best first; deterministic given the lattice (None: no drafter) and the committed ids."""
        ...

    def accept(self, context: list[int]) -> None:
        """Called after each commit with the new committed ids (stateful refiners roll back here)."""
        ...


class ArgmaxRefiner:
    """One draft: each head's top-1 token (Stern et al.'s block draft)."""

    def refine(self, lattice: Lattice | None, context: list[int]) -> list[list[int]]:
        return [lattice.tokens[:, 0].tolist()] if lattice is not None else []

    def accept(self, context: list[int]) -> None:
        pass


class TreeRefiner:
    """The drafter's own tree as it drafted it (the eagle drafter chooses its nodes itself)."""

    def refine(self, lattice: DraftTree | None, context: list[int]) -> list[list[int]]:
        return [list(p) for p in lattice.paths] if lattice is not None else []

    def accept(self, context: list[int]) -> None:
        pass
