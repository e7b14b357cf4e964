"""Decoding methods as data: a `MethodSpec` says which drafter and refiner run, with what settings;
`build` turns a spec and the loaded parts into the (drafter, refiner) pair the engine runs.

Names, one spelling each (`parse` refuses any other in one line, before a model loads):

    ar | lookup | fast | eagle          presets (PRESETS)
    BASE[-fit][-ctx]                    BASE = bpd | bpd-full | bpd-ngram[-p{P}] | bpd-0gram-p{P} | bpd-neural
    eagle[-ctx]                         the eagle drafter's own tree (it sizes the tree itself: no -fit)

`-fit` sizes a heads method's drafts to this machine's cost curve (blockdraft.sizing); `-ctx`
adds a draft looked up in the context (blockdraft.lookup); in that order. 1 <= P <= P_MAX.

Adding a drafter kind: a function (spec, parts, record) -> Drafter in DRAFTERS, the part it
reads in NEEDS, and, for a name, an entry in BASES (or a family pattern in `_base`).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .drafting import Drafter, HeadsDrafter, NoDrafter
from .errors import BlockdraftError
from .lookup import ContextLookup
from .refine.base import ArgmaxRefiner, Refiner, TreeRefiner
from .sizing import FittedRefiner

if TYPE_CHECKING:
    import torch

    from .eagle.model import EagleLayer
    from .heads import DraftHeads
    from .refine.neural import Rescorer
    from .refine.ngram import NgramLM
    from .sizing import CostCurve

P_MAX = 64  # drafts per step of a p-best method (a tree of up to P_MAX x heads nodes)
TOPK_MAX = 64  # candidates per draft position in a lattice
LATTICE_TOPK = 16  # candidates per head in the refiners' lattice (the paper's k)
BPD_STOP = 0.05  # bpd ends a draft where the heads give its chain less chance than this (README: "Adaptive draft size")
# Sized drafts skip the heads past this chance of the argmax chain (the likeliest path under the
# head scores): no node that unlikely pays for its forward time here (cost(2)/cost(1) ~ 1.1).
FIT_STOP = 0.02
FIT_TOPK = 4  # sizing reads the probabilities of the drafted tokens from the lattice: at least this wide
FAST_PBEST = 4  # drafts per step of the default method before sizing (README: "Choosing a method")


@dataclass(frozen=True)
class MethodSpec:
    """One decoding method. Invalid combinations are refused in one line when the spec is made."""

    drafter: str = "none"  # "none" (plain decoding: no lattice), "heads" (the loaded draft heads) or "eagle"; see DRAFTERS
    topk: int = 1  # candidates per draft position in the lattice
    stop: float = 0.0  # end a draft where the heads' chance of its argmax chain falls below this (0: never)
    refiner: str = "argmax"  # "argmax" (each head's top-1), "pbest" (p best lattice paths), "neural" or "tree" (eagle's own)
    p: int = 1  # drafts per step ("pbest")
    alpha: float | None = None  # rescoring weight; None: the tuned one for the prompt's domain; "pbest" with 0: no n-gram LM
    fit: bool = False  # trim the drafts to the nodes that pay for their forward time on this machine
    context: bool = False  # add a draft looked up in the context
    best_effort: bool = False  # use what is loaded: no n-gram LM -> alpha 0, no heads -> the context lookup alone

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem:
            raise BlockdraftError(f"invalid method: {problem}")

    @property
    def needs(self) -> frozenset[str]:
        """The loaded parts `build` reads: "heads", "ngram", "rescorer", "cost"."""
        needs = set(NEEDS.get(self.drafter, ()))
        if self.refiner == "pbest" and self.alpha != 0:
            needs.add("ngram")
        if self.refiner == "neural":
            needs.add("rescorer")
        if self.fit:
            needs.add("cost")
        return frozenset(needs)

    @property
    def name(self) -> str:
        """The canonical name of this spec, or a description where no name spells it."""
        for candidate in _names_for(self):
            if parse(candidate) == self:
                return candidate
        fields = (f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                  if getattr(self, f.name) != f.default)
        return f"MethodSpec({', '.join(fields)})"


def _problem(spec: MethodSpec) -> str:
    """What makes a spec invalid ("" when nothing)."""
    if spec.drafter not in DRAFTERS:
        return f"unknown drafter {spec.drafter!r}; choose one of {', '.join(DRAFTERS)}"
    if spec.refiner not in REFINERS:
        return f"unknown refiner {spec.refiner!r}; choose one of {', '.join(REFINERS)}"
    if not 1 <= spec.topk <= TOPK_MAX:
        return f"top-k must be between 1 and {TOPK_MAX}, got {spec.topk}"
    if not 1 <= spec.p <= P_MAX:
        return f"p must be between 1 and {P_MAX}, got {spec.p}"
    if spec.p != 1 and spec.refiner != "pbest":
        return "p (drafts per step) needs the pbest refiner"
    if not 0.0 <= spec.stop <= 1.0:
        return f"stop threshold must be between 0 and 1, got {spec.stop}"
    if spec.alpha is not None and not spec.alpha >= 0:
        return f"alpha must be >= 0, got {spec.alpha}"
    if spec.drafter == "none" and spec.refiner != "argmax":
        return f"the {spec.refiner} refiner reads a lattice: it needs a drafter"
    if spec.drafter == "none" and spec.fit:
        return "-fit sizes drafted blocks by their probabilities: it needs a drafter (ar and lookup have none)"
    if (spec.drafter == "eagle") != (spec.refiner == "tree"):
        return "the eagle drafter drafts its own tree: it takes the tree refiner, and only it does"
    if spec.drafter == "eagle" and (spec.fit or spec.topk != 1 or spec.stop):
        return "the eagle drafter sizes its own tree: no -fit, top-k or stop threshold"
    return ""


# ---------------------------------------------------------------------------------------------
# Building


@dataclass(frozen=True)
class Parts:
    """The loaded parts builders read (None where the spec does not need them)."""

    lm_head: "torch.nn.Module"  # the target's output projection (drafters project through it)
    heads: "DraftHeads | None" = None
    eagle: "EagleLayer | None" = None
    embed: "torch.Tensor | None" = None  # the target's input embedding (the eagle drafter reads it)
    ngram: "NgramLM | None" = None
    rescorer: "Rescorer | None" = None
    cost: "CostCurve | None" = None

    def require(self, part: str):
        value = getattr(self, part)
        if value is None:
            raise BlockdraftError(f"this method needs {part}, which is not loaded")
        return value


def build(spec: MethodSpec, parts: Parts, record: bool = False, domain: str | None = None) -> tuple[Drafter, Refiner]:
    """A fresh (drafter, refiner) pair for one generation; reads `parts` and changes nothing in them.

    record: drafters add each head's entropy to the lattice (analysis); domain: the prompt's
    training domain, which picks the tuned alpha of a rescoring refiner.
    """
    if spec.best_effort:
        spec = settle(spec, parts.heads is not None, parts.ngram is not None)
    drafter = DRAFTERS[spec.drafter](spec, parts, record)
    refiner = REFINERS[spec.refiner](spec, parts, domain)
    if spec.fit:
        refiner = FittedRefiner(refiner, parts.require("cost"))
    if spec.context:
        refiner = ContextLookup(refiner)
    return drafter, refiner


def _no_drafter(spec: MethodSpec, parts: Parts, record: bool) -> Drafter:
    return NoDrafter()


def _heads_drafter(spec: MethodSpec, parts: Parts, record: bool) -> Drafter:
    """The loaded BPD heads."""
    return HeadsDrafter(parts.require("heads"), parts.lm_head, topk=spec.topk, with_entropy=record, stop_below=spec.stop)


def _eagle_drafter(spec: MethodSpec, parts: Parts, record: bool) -> Drafter:
    """The loaded eagle layer, drafting a tree from the target's fused features."""
    from .eagle.drafter import EagleDrafter

    return EagleDrafter(parts.require("eagle"), parts.require("embed"), cost=parts.require("cost"))


def _argmax(spec: MethodSpec, parts: Parts, domain: str | None) -> Refiner:
    return ArgmaxRefiner()


def _tree(spec: MethodSpec, parts: Parts, domain: str | None) -> Refiner:
    return TreeRefiner()


def _pbest(spec: MethodSpec, parts: Parts, domain: str | None) -> Refiner:
    from .refine.lattice import PBestRefiner

    if spec.alpha == 0:
        return PBestRefiner(None, 0.0, spec.p)
    lm = parts.require("ngram")
    alpha = spec.alpha if spec.alpha is not None else pick_alpha(lm.meta.get("alpha", {}), domain)
    return PBestRefiner(lm, alpha, spec.p)


def _neural(spec: MethodSpec, parts: Parts, domain: str | None) -> Refiner:
    from .refine.neural import NeuralRefiner

    rescorer = parts.require("rescorer")
    return NeuralRefiner(rescorer, spec.alpha if spec.alpha is not None else pick_alpha(rescorer.alpha, domain))


def pick_alpha(table: dict, domain: str | None) -> float:
    """The tuned alpha for a training-prompt domain, else the table's default (1.0 without one)."""
    return float(table.get(domain or "", table.get("default", 1.0)))


DRAFTERS: dict[str, Callable[[MethodSpec, Parts, bool], Drafter]] = {
    "none": _no_drafter, "heads": _heads_drafter, "eagle": _eagle_drafter}
# the parts each drafter reads (the eagle drafter sizes its tree by the cost curve itself)
NEEDS: dict[str, tuple[str, ...]] = {"none": (), "heads": ("heads",), "eagle": ("eagle", "cost")}
REFINERS: dict[str, Callable[[MethodSpec, Parts, str | None], Refiner]] = {
    "argmax": _argmax, "pbest": _pbest, "neural": _neural, "tree": _tree}


# ---------------------------------------------------------------------------------------------
# Names


PRESETS: dict[str, MethodSpec] = {
    "ar": MethodSpec(),
    "bpd": MethodSpec(drafter="heads", stop=BPD_STOP),
    "bpd-full": MethodSpec(drafter="heads"),  # the paper's BPD: every head drafts, every step
    "lookup": MethodSpec(context=True),
    # The default: heads -> n-gram rescored p-best (head scores alone without an n-gram LM) ->
    # trimmed to the nodes that pay for their forward time -> plus a context lookup draft.
    "fast": MethodSpec(drafter="heads", topk=LATTICE_TOPK, stop=FIT_STOP, refiner="pbest", p=FAST_PBEST,
                       fit=True, context=True, best_effort=True),
    "eagle": MethodSpec(drafter="eagle", refiner="tree"),
}
# The heads methods that take -fit and -ctx (families with a p are parsed in `_base`).
BASES: dict[str, MethodSpec] = {
    "bpd": PRESETS["bpd"],
    "bpd-full": PRESETS["bpd-full"],
    "bpd-neural": MethodSpec(drafter="heads", topk=LATTICE_TOPK, refiner="neural"),
    "eagle": PRESETS["eagle"],
}
FAMILY_HELP = ["eagle-ctx", "bpd-ngram", "bpd-ngram-p{P}", "bpd-0gram-p{P}", "bpd-neural", "{method}-fit", "{method}-ctx",
               "{method}-fit-ctx"]
MAX_NAME = 120  # longer names are refused before parsing


def available() -> list[str]:
    """Method names for help texts: the presets, then the families."""
    return list(PRESETS) + FAMILY_HELP


def parse(name: str) -> MethodSpec:
    """The spec of a method name; anything but the canonical spelling is a one-line BlockdraftError.

    >>> parse("bpd-0gram-p4-fit-ctx").p, parse("bpd-0gram-p4-fit-ctx").context
    (4, True)
    """
    if not isinstance(name, str):
        raise BlockdraftError(f"a method is a name such as 'fast' or 'bpd', got {type(name).__name__}")
    shown = name if len(name) <= 60 else name[:57] + "..."
    if len(name) > MAX_NAME:
        raise BlockdraftError(f"unknown method {shown!r}: names are at most {MAX_NAME} characters")
    if name in PRESETS:
        return PRESETS[name]
    rest, fit, context = name, False, False
    if rest.endswith("-ctx"):
        rest, context = rest[: -len("-ctx")], True
    if rest.endswith("-fit"):
        rest, fit = rest[: -len("-fit")], True
    for suffix in ("-ctx", "-fit"):
        if f"{suffix}-" in rest + "-":
            raise BlockdraftError(f"unknown method {shown!r}: write the base method, then at most one -fit, then at "
                                  "most one -ctx (e.g. bpd-ngram-p4-fit-ctx)")
    if rest in ("ar", "lookup", "fast"):
        hint = {"ar": "ar has no drafts to size; for context drafts use lookup", "lookup": "lookup takes no suffix",
                "fast": "fast already sizes its drafts and looks up the context"}[rest]
        raise BlockdraftError(f"unknown method {shown!r}: {hint}")
    base = _base(rest, shown)
    if fit and base.drafter == "eagle":
        raise BlockdraftError(f"unknown method {shown!r}: eagle sizes its own tree to the cost curve (no -fit)")
    if fit:
        base = dataclasses.replace(base, topk=max(base.topk, FIT_TOPK), stop=max(base.stop, FIT_STOP), fit=True)
    return dataclasses.replace(base, context=context) if context else base


def _base(rest: str, shown: str) -> MethodSpec:
    if rest in BASES:
        return BASES[rest]
    m = re.fullmatch(r"bpd-(ngram|0gram)(?:-p(\d+))?", rest)
    if m is None:
        raise BlockdraftError(f"unknown method {shown!r}; choose one of {', '.join(available())}")
    lm, digits = m.groups()
    if digits is None and lm == "0gram":
        raise BlockdraftError(f"unknown method {shown!r}: bpd-0gram needs its drafts per step, e.g. bpd-0gram-p4")
    if digits is not None and (digits != str(int(digits)) or not 1 <= int(digits) <= P_MAX):
        raise BlockdraftError(f"unknown method {shown!r}: p is a whole number from 1 to {P_MAX} (e.g. -p4)")
    return MethodSpec(drafter="heads", topk=LATTICE_TOPK, refiner="pbest", p=int(digits or 1),
                      alpha=0.0 if lm == "0gram" else None)


def _names_for(spec: MethodSpec) -> list[str]:
    """Names that may spell `spec` (parse decides)."""
    names = list(PRESETS)
    bases = list(BASES) + ["bpd-ngram" if spec.p == 1 else f"bpd-ngram-p{spec.p}", f"bpd-0gram-p{spec.p}"]
    for base in bases:
        names += [base, f"{base}-ctx"] if base == "eagle" else [base, f"{base}-fit", f"{base}-ctx", f"{base}-fit-ctx"]
    return names


def settle(spec: MethodSpec, heads: bool, ngram: bool) -> MethodSpec:
    """A best-effort spec (fast) made concrete for what is loaded: without heads the context lookup
    alone, without an n-gram LM the head scores alone. Other specs are returned as they are."""
    if not spec.best_effort:
        return spec
    if not heads:
        return PRESETS["lookup"]
    return dataclasses.replace(spec, best_effort=False, alpha=spec.alpha if ngram else 0.0)


def to_spec(method: str | MethodSpec) -> MethodSpec:
    """A spec from a name or a spec."""
    return method if isinstance(method, MethodSpec) else parse(method)
