"""The Python API: `blockdraft.load(...)` returns a Decoder whose `.generate(...)` mirrors the CLI.

    >>> import blockdraft
    >>> dec = blockdraft.load()                      # SmolLM2-135M-Instruct + shipped heads
    >>> out = dec.generate("Name three rivers.", method="bpd", max_new_tokens=64)
    >>> out.text, out.block_efficiency
"""
from __future__ import annotations

from pathlib import Path

import torch

from .drafting import Drafter
from .engine import DecodeConfig, generate
from .errors import BlockdraftError
from .feature_head import FeatureHead
from .heads import DraftHeads, load_heads
from .methods import MethodSpec, Parts, build, settle, to_spec
from .models import ALIASES, DEFAULT_MODEL, LoadedModel, load_model
from .prompting import encode_chat
from .refine.base import Refiner
from .target import TargetModel
from .types import DecodeResult

ASSETS = Path(__file__).parent / "assets"


def shipped_heads(alias: str | None) -> Path | None:
    """The heads bundled with the package for a model alias (None for any other model)."""
    if alias not in ALIASES:
        return None
    path = ASSETS / "heads" / alias
    return path if (path / "config.json").exists() else None


def shipped_refiner(alias: str | None, name: str) -> Path | None:
    """A bundled refiner resource (`ngram.npz` or the `rescorer` folder) for a model alias."""
    if alias not in ALIASES:
        return None
    path = ASSETS / "refiners" / alias / name
    return path if path.exists() else None


class Decoder:
    """A loaded target model plus its drafting parts; one generate() call per prompt."""

    def __init__(self, loaded: LoadedModel, heads: DraftHeads | FeatureHead | None, heads_path: str | None):
        self.loaded, self.heads, self.heads_path = loaded, heads, heads_path
        self.target = TargetModel(loaded.model)
        self.ngram_path = shipped_refiner(loaded.alias, "ngram.npz")
        self.rescorer_path = shipped_refiner(loaded.alias, "rescorer")
        self._ngram = self._rescorer = self._cost = None

    def cost_curve(self):
        """The target's forward time per input size on this machine (for sized drafts); measured
        once per model, device, dtype, thread count, CPU and decoder body, then read from the cache folder."""
        from .cpu import LINEAR_PATH, cpu_model
        from .models import cache_root
        from .sizing import cached_cost_curve

        if self._cost is None:
            weight = self.target.lm_head.weight
            key = {"model": self.loaded.alias or self.loaded.name, "fingerprint": self.loaded.fingerprint, "device": str(weight.device),
                   "dtype": str(weight.dtype), "threads": torch.get_num_threads(), "cpu": cpu_model(),
                   "lm_head": type(self.target.lm_head).__name__, "torch": torch.__version__, "linear": LINEAR_PATH,
                   "body": self.target.path}
            self._cost = cached_cost_curve(self.target, key, cache_root() / "cost-curves")
        return self._cost

    def ngram(self):
        """The token n-gram LM of the global rescoring methods (loaded once)."""
        from .refine.ngram import NgramLM

        if self._ngram is None:
            if self.ngram_path is None:
                raise BlockdraftError(f"no n-gram LM for {self.loaded.name!r}: train one with `blockdraft train-ngram` and set Decoder.ngram_path")
            self._ngram = NgramLM.load(self.ngram_path, vocab_size=self.target.lm_head.weight.shape[0])
        return self._ngram

    def rescorer(self):
        """The small LM of local neural rescoring (loaded once)."""
        from .refine.neural import load_rescorer

        if self._rescorer is None:
            if self.rescorer_path is None:
                raise BlockdraftError(f"no rescorer for {self.loaded.name!r}: train one with `blockdraft train-rescorer` and set Decoder.rescorer_path")
            self._rescorer = load_rescorer(self.rescorer_path, self.loaded.fingerprint,
                                          vocab_size=self.target.lm_head.weight.shape[0])
        return self._rescorer

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def require_heads(self) -> DraftHeads | FeatureHead:
        if self.heads is None:
            raise BlockdraftError(
                f"no draft heads for model {self.loaded.name!r}: pass --heads PATH (train them with "
                "`blockdraft train-heads`) or use --method ar or lookup"
            )
        return self.heads

    def require_bpd_heads(self, purpose: str) -> DraftHeads:
        """The loaded heads when they are BPD heads (teacher-forced scoring reads them in parallel)."""
        heads = self.require_heads()
        if not isinstance(heads, DraftHeads):
            raise BlockdraftError(f"{purpose} needs BPD draft heads (`blockdraft train-heads`), not a feature head: pass --heads")
        return heads

    def spec(self, method: str | MethodSpec) -> MethodSpec:
        """The concrete spec of a method name or spec for what this decoder has loaded (see methods.settle)."""
        return settle(to_spec(method), self.heads is not None, self.ngram_path is not None)

    def parts(self, spec: MethodSpec) -> Parts:
        """The parts a spec needs, loaded once each; a missing one is a one-line error."""
        needs = spec.needs
        return Parts(self.target.lm_head, heads=self.require_heads() if "heads" in needs else None,
                     ngram=self.ngram() if "ngram" in needs else None,
                     rescorer=self.rescorer() if "rescorer" in needs else None,
                     cost=self.cost_curve() if "cost" in needs else None)

    def build(self, method: str | MethodSpec = "fast", record: bool = False,
              domain: str | None = None) -> tuple[Drafter, Refiner]:
        """A fresh drafter and refiner for one generation (blockdraft.methods.build)."""
        spec = self.spec(method)
        return build(spec, self.parts(spec), record=record, domain=domain)

    def stop_ids(self) -> tuple[int, ...]:
        eos = self.loaded.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(ids))

    def encode(self, prompt: str | list[str], answers: list[str] | None = None, raw: bool = False) -> list[int]:
        turns = [prompt] if isinstance(prompt, str) else list(prompt)
        return encode_chat(self.tokenizer, turns, answers, raw=raw)

    def generate(self, prompt: str | list[str] | None = None, *, ids: list[int] | None = None,
                 method: str | MethodSpec = "fast", max_new_tokens: int = 128, raw: bool = False,
                 stop: tuple[str, ...] = (), answers: list[str] | None = None, on_text=None, record: bool = False,
                 domain: str | None = None) -> DecodeResult:
        """Greedy generation; `method` names a drafter + refiner (see blockdraft.methods).

        record: keep each step's lattice and draft (analysis); domain: the training-prompt domain
        whose tuned rescoring weight the refiners use (default: their overall one).
        """
        spec = self.spec(method)  # a bad name fails before any work
        if ids is None:
            if prompt is None:
                raise BlockdraftError("give a prompt or ids")
            ids = self.encode(prompt, answers, raw)
        drafter, refiner = build(spec, self.parts(spec), record=record, domain=domain)
        cfg = DecodeConfig(max_new_tokens=max_new_tokens, stop_ids=self.stop_ids(), stop_strings=tuple(stop),
                           record_lattices=record)
        return generate(self.target, drafter, refiner, list(ids), cfg, self.tokenizer,
                        on_commit=_text_streamer(self.tokenizer, on_text) if on_text else None)


def _text_streamer(tokenizer, on_text):
    """Turn committed ids into text deltas (decoding the whole answer keeps multi-byte tokens right)."""
    seen: list[int] = []
    shown = [""]

    def push(new: list[int]) -> None:
        seen.extend(new)
        text = tokenizer.decode(seen, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(shown[0]):
            on_text(text[len(shown[0]):])
            shown[0] = text

    return push


def load(model: str = DEFAULT_MODEL, heads: str | None = "default", dtype: str = "float32",
         device: str | None = None, onednn: bool = True, offline: bool | None = None) -> Decoder:
    """Load a target model and draft heads. heads="default" picks the shipped heads of a known
    alias (also when the model is given as a folder holding that alias's weights); other models
    have none unless a heads folder is given.

    offline=None reads only the local cache when the user set HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE;
    True always does; False allows hub downloads (blockdraft.models.load_model).

    onednn=True runs a CPU float32 model's linear layers through oneDNN (blockdraft.cpu): the
    same math with kernels that are 1.4-2x faster here, for every method alike. Draft heads run
    in bfloat16 where the CPU has native bfloat16 (drafts only propose; the target verifies
    in its own dtype, so the output is unchanged).
    """
    from .cpu import attend_with_grouped_kv, fast_bfloat16, use_onednn_linears

    loaded = load_model(model, dtype, device, offline)
    shipped = shipped_heads(loaded.alias)
    path = (str(shipped) if shipped else None) if heads == "default" else heads
    cpu_fast_path = onednn and loaded.device.type == "cpu"
    draft_heads = None
    if path:
        bf16 = cpu_fast_path and loaded.model.dtype == torch.float32 and fast_bfloat16()
        draft_heads = load_heads(path, dtype=torch.bfloat16 if bf16 else loaded.model.dtype, device=loaded.device)
        draft_heads.check_compatible(loaded.model, loaded.fingerprint)
    if cpu_fast_path:
        use_onednn_linears(loaded.model)
        attend_with_grouped_kv()
    return Decoder(loaded, draft_heads, path)
