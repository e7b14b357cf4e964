"""The Python API: `blockdraft.load(...)` returns a Decoder whose `.generate(...)` mirrors the CLI.

    >>> import blockdraft
    >>> dec = blockdraft.load()                      # SmolLM2-135M-Instruct + shipped heads
    >>> out = dec.generate("Name three rivers.", method="bpd", max_new_tokens=64)
    >>> out.text, out.block_efficiency
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .drafting import Drafter
from .engine import DecodeConfig, generate
from .errors import BlockdraftError
from .heads import DraftHeads, load_heads
from .methods import MethodSpec, Parts, build, settle, to_spec
from .models import ALIASES, DEFAULT_MODEL, LoadedModel, auto_weights, load_model
from .prompting import check_text, encode_chat, stop_strings
from .refine.base import Refiner
from .sampling import parse_sampling
from .target import TargetModel
from .types import DecodeResult

ASSETS = Path(__file__).parent / "assets"


def shipped_heads(alias: str | None) -> Path | None:
    """The heads bundled with the package for a model alias (None for any other model)."""
    if alias not in ALIASES:
        return None
    path = ASSETS / "heads" / alias
    return path if (path / "config.json").exists() else None


def shipped_eagle(alias: str | None) -> Path | None:
    """The eagle drafter bundled with the package for a model alias (None for any other model)."""
    if alias not in ALIASES:
        return None
    path = ASSETS / "eagle" / alias
    return path if (path / "config.json").exists() else None


def shipped_refiner(alias: str | None, name: str) -> Path | None:
    """A bundled refiner resource (`ngram.npz` or the `rescorer` folder) for a model alias."""
    if alias not in ALIASES:
        return None
    path = ASSETS / "refiners" / alias / name
    return path if path.exists() else None


class Decoder:
    """A loaded target model plus its drafting parts; one generate() call per prompt.

    Build one with `blockdraft.load(...)` (loads the model) or `Decoder.from_model(...)` (a model
    the caller already has).
    """

    def __init__(self, loaded: LoadedModel, heads: DraftHeads | None, heads_path: str | None,
                 method: str | MethodSpec = "fast", lm_head: torch.nn.Module | None = None):
        self.loaded, self.heads, self.heads_path = loaded, heads, heads_path
        self.method = method  # generate()'s method when it is given none
        self.target = TargetModel(loaded.model, lm_head=lm_head)
        self.swapped_linears = 0  # nn.Linear layers of loaded.model swapped in place (blockdraft.load; undone by release)
        self.replaced_attention: str | None = None  # the attention implementation blockdraft.load replaced
        self.released = False
        self.ngram_path = shipped_refiner(loaded.alias, "ngram.npz")
        self.rescorer_path = shipped_refiner(loaded.alias, "rescorer")
        self.eagle_path = shipped_eagle(loaded.alias)
        self._ngram = self._rescorer = self._cost = self._eagle = None

    def use_eagle(self, folder: str | Path) -> None:
        """Draft `eagle` methods with the eagle drafter in this folder from now on (loaded on first use)."""
        self.eagle_path, self._eagle = Path(folder), None

    def eagle(self):
        """The eagle draft layer (loaded once; bfloat16 where the CPU has native bfloat16, as the
        heads; its products in oneDNN's layout on the CPU)."""
        from .cpu import fast_bfloat16, pack_drafter_linears
        from .eagle.model import load_eagle

        if self._eagle is None:
            if self.eagle_path is None:
                raise BlockdraftError(f"no eagle drafter for {self.loaded.name!r}: train one with `blockdraft train-eagle` "
                                      "and pass it with --eagle (Decoder.use_eagle)")
            model = self.loaded.model
            bf16 = model.dtype == torch.float32 and self.loaded.device.type == "cpu" and fast_bfloat16()
            layer = load_eagle(self.eagle_path, dtype=torch.bfloat16 if bf16 else model.dtype, device=self.loaded.device)
            layer.check_compatible(model, self.loaded.fingerprint)
            layer.fuse_qkv()  # one product for q, k and v while drafting
            pack_drafter_linears(layer)  # oneDNN's layout on the CPU: the same products, faster
            self._eagle = layer
        return self._eagle

    def use_refiner_files(self, ngram: str | Path | None = None, rescorer: str | Path | None = None) -> None:
        """Read the n-gram LM and/or the neural rescorer from these files from now on (instead of
        the shipped ones); each is loaded on first use."""
        if ngram is not None:
            self.ngram_path, self._ngram = Path(ngram), None
        if rescorer is not None:
            self.rescorer_path, self._rescorer = Path(rescorer), None

    def cost_curve(self, remeasure: bool = False):
        """The target's forward time per input size on this machine (for sized drafts); measured
        once per model, device, dtype, thread count, CPU, decoder body, projection kernel and KV cache dtype, then read from the cache
        folder; remeasure=True measures it again (and caches it unless the machine looked busy)."""
        from .cpu import cpu_model, linear_path
        from .exact_attention import LAYOUT
        from .fastpath import projection_kind
        from .models import cache_root
        from .sizing import cached_cost_curve

        if self._cost is None or remeasure:
            weight = self.target.lm_head.weight
            key = {"model": self.loaded.alias or self.loaded.name, "fingerprint": self.loaded.fingerprint, "device": str(weight.device),
                   "dtype": self.loaded.dtype_name, "threads": torch.get_num_threads(), "cpu": cpu_model(),
                   "lm_head": type(self.target.lm_head).__name__, "torch": torch.__version__, "linear": linear_path(weight.dtype),
                   "body": self.target.path, "projections": projection_kind(self.loaded.model), "exact_attention": LAYOUT,
                   "kv_cache": str(self.target.cache_dtype)}
            self._cost = cached_cost_curve(self.target, key, cache_root() / "cost-curves", remeasure)
        return self._cost

    def ngram(self):
        """The token n-gram LM of the global rescoring methods (loaded once)."""
        from .refine.ngram import NgramLM

        if self._ngram is None:
            if self.ngram_path is None:
                raise BlockdraftError(f"no n-gram LM for {self.loaded.name!r}: train one with `blockdraft train-ngram` and pass it to Decoder.use_refiner_files")
            self._ngram = NgramLM.load(self.ngram_path, vocab_size=self.target.lm_head.weight.shape[0])
        return self._ngram

    def rescorer(self):
        """The small LM of local neural rescoring (loaded once)."""
        from .refine.neural import load_rescorer

        if self._rescorer is None:
            if self.rescorer_path is None:
                raise BlockdraftError(f"no rescorer for {self.loaded.name!r}: train one with `blockdraft train-rescorer` and pass it to Decoder.use_refiner_files")
            self._rescorer = load_rescorer(self.rescorer_path, self.loaded.fingerprint,
                                          vocab_size=self.target.lm_head.weight.shape[0])
        return self._rescorer

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def require_heads(self) -> DraftHeads:
        if self.heads is None:
            raise BlockdraftError(
                f"no draft heads for model {self.loaded.name!r}: pass --heads PATH (train them with "
                "`blockdraft train-heads`) or use --method ar or lookup"
            )
        return self.heads

    def spec(self, method: str | MethodSpec) -> MethodSpec:
        """The concrete spec of a method name or spec for what this decoder has loaded (see methods.settle)."""
        return settle(to_spec(method), self.heads is not None, self.ngram_path is not None)

    def parts(self, spec: MethodSpec) -> Parts:
        """The parts a spec needs, loaded once each; a missing one is a one-line error."""
        needs = spec.needs
        eagle = "eagle" in needs
        return Parts(self.target.lm_head, heads=self.require_heads() if "heads" in needs else None,
                     eagle=self.eagle() if eagle else None,
                     embed=self.loaded.model.get_input_embeddings().weight if eagle else None,
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

    def encode(self, prompt: str | list[str], answers: list[str] | None = None, raw: bool = False,
               system: str | None = None) -> list[int]:
        turns = [prompt] if isinstance(prompt, str) else list(prompt)
        return encode_chat(self.tokenizer, turns, answers, raw=raw, system=system)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer, heads: str | DraftHeads | None = "default",
                   method: str | MethodSpec = "fast", onednn: bool = True, name: str | None = None) -> "Decoder":
        """A Decoder around a transformers causal LM and tokenizer the caller already loaded.

        The caller's model is not changed: no module is swapped, no weight or setting is
        written. The CPU fast path packs private copies of the weights instead (onednn=True:
        the output projection for oneDNN; the Llama decoder's fused projections), which costs
        memory about the size of those weights; `release()` drops them. The model must be in
        eval mode (`model.eval()`), as from_pretrained returns it.

        heads: "default" (the shipped heads when the model's weights are a known alias's), a
        heads folder, a DraftHeads object, or None (then `ar`, `lookup` and
        `fast`, which falls back to lookup, work). `method` is generate()'s default.
        """
        from .cpu import OneDNNLinear, can_pack
        from .models import alias_of, model_fingerprint

        if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_output_embeddings"):
            raise BlockdraftError(f"from_model needs a transformers causal LM, not {type(model).__name__}")
        if model.training:
            raise BlockdraftError("the model is in training mode (dropout on): call model.eval() first")
        to_spec(method)  # a bad name fails now
        fingerprint = model_fingerprint(model)
        label = name or getattr(model, "name_or_path", "") or type(model).__name__
        loaded = LoadedModel(model=model, tokenizer=tokenizer, name=label, fingerprint=fingerprint,
                             alias=alias_of(fingerprint))
        lm_head = model.get_output_embeddings()
        private = onednn and type(lm_head) is torch.nn.Linear and can_pack(lm_head.weight)
        draft_heads, path = _draft_heads(loaded, heads, cpu_fast_path=onednn and loaded.device.type == "cpu")
        return cls(loaded, draft_heads, path, method=method, lm_head=OneDNNLinear(lm_head) if private else None)

    def release(self) -> None:
        """Give the model back as it was: undo in-place changes (blockdraft.load swaps a CPU float32
        model's nn.Linear layers for oneDNN ones) and drop the private packed copies of its
        weights. The Decoder cannot generate afterwards."""
        from .cpu import restore_attention, restore_linears

        if self.swapped_linears:
            restore_linears(self.loaded.model)
            self.swapped_linears = 0
        restore_attention(self.loaded.model, self.replaced_attention)
        self.replaced_attention = None
        self.target = None
        self._cost = None
        self.released = True

    def generate(self, prompt: str | list[str] | None = None, *, ids: list[int] | None = None,
                 method: str | MethodSpec | None = None, max_new_tokens: int = 128, raw: bool = False,
                 stop: tuple[str, ...] = (), answers: list[str] | None = None, system: str | None = None,
                 on_text=None, streamer=None, record: bool = False, domain: str | None = None,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> DecodeResult:
        """Generation; `method` names a drafter + refiner (see blockdraft.methods), by default
        the Decoder's own (`fast` unless from_model was given another). The output is the model's
        own: temperature 0 (default) is its greedy decode; temperature > 0 samples from
        temperature, then top_k, then top_p, as transformers applies them, with drafts verified
        against the sampled token (one seed, one output for every method: plain sampling's;
        result.seed repeats an unseeded run).
        stop: a string or strings that end the answer.

        system: a system message for chat models (through the chat template). on_text(delta)
        receives the answer's text as it is committed; the deltas add up to the returned `text`
        exactly (text that may begin a stop string waits until it is known not to). `streamer`
        is any object with transformers' streamer protocol (`TextStreamer`,
        `TextIteratorStreamer`: put(ids tensor), end()), fed as `model.generate` feeds it: the
        prompt ids, then the committed ids step by step, then end() (also after an error).
        record: keep each step's lattice and draft (analysis); domain: the training-prompt domain
        whose tuned rescoring weight the refiners use (default: their overall one).
        """
        if self.released:
            raise BlockdraftError("this Decoder was released; build a new one")
        spec = self.spec(method if method is not None else self.method)  # a bad name fails before any work
        sampling = parse_sampling(temperature, top_k, top_p, seed)
        stop = stop_strings(stop)
        _check_types(prompt, ids, answers, system, max_new_tokens, self.target.lm_head.weight.shape[0])
        if ids is None:
            if prompt is None:
                raise BlockdraftError("give a prompt or ids")
            ids = self.encode(prompt, answers, raw, system)
        drafter, refiner = build(spec, self.parts(spec), record=record, domain=domain)
        cfg = DecodeConfig(max_new_tokens=max_new_tokens, stop_ids=self.stop_ids(), stop_strings=stop,
                           record_lattices=record, sampling=sampling)
        text = _TextDeltas(self.tokenizer, on_text, stop) if on_text else None
        sinks = [sink for sink in (text, _StreamerFeed(streamer) if streamer is not None else None) if sink]
        if streamer is not None:
            streamer.put(torch.tensor([list(ids)]))
        try:
            result = generate(self.target, drafter, refiner, list(ids), cfg, self.tokenizer,
                              on_commit=(lambda new: [sink(new) for sink in sinks]) if sinks else None)
        finally:
            if streamer is not None:
                streamer.end()
        if text is not None:
            text.finish(result.text)
        return result


def _check_types(prompt: object, ids: object, answers: object, system: object, max_new_tokens: object,
                 vocab_size: int) -> None:
    """One line for a request the engine cannot take: wrong types, ids outside the vocabulary, text
    that is not valid UTF-8 (a lone surrogate from an undecodable byte)."""
    if prompt is not None:
        turns = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(turns, (list, tuple)) or not turns:
            raise BlockdraftError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        for turn in turns:
            check_text("prompt", turn)
    for turn in answers or ():
        check_text("answers", turn)
    if system is not None:
        check_text("system", system)
    if ids is not None and (not isinstance(ids, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids)):
        raise BlockdraftError(f"ids must be a list of token ids in [0, {vocab_size})")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise BlockdraftError(f"max_new_tokens must be a whole number, got {max_new_tokens!r}")


class _StreamerFeed:
    """Committed ids to a transformers streamer, one 1-D tensor per step (as TextStreamer.put takes them)."""

    def __init__(self, streamer):
        self.streamer = streamer

    def __call__(self, new: list[int]) -> None:
        self.streamer.put(torch.tensor(new))


class _TextDeltas:
    """Committed ids -> text deltas whose concatenation is the final text.

    The whole answer is decoded each time (multi-byte tokens come out right); the last
    len(longest stop string) - 1 characters wait, since the final text is cut where a stop
    string begins (cut there once one has come), and finish() sends the rest of the final text.
    """

    def __init__(self, tokenizer, on_text, stop: tuple[str, ...] = ()):
        self.tokenizer, self.on_text, self.stop = tokenizer, on_text, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.seen: list[int] = []
        self.shown = ""

    def __call__(self, new: list[int]) -> None:
        self.seen.extend(new)
        text = self.tokenizer.decode(self.seen, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        cuts = [text.find(s) for s in self.stop if s in text]
        self._send(text[: min(cuts)] if cuts else text[: max(0, len(text) - self.hold)])

    def finish(self, final: str) -> None:
        self._send(final)

    def _send(self, text: str) -> None:
        if len(text) > len(self.shown) and text.startswith(self.shown):
            self.on_text(text[len(self.shown):])
            self.shown = text


def _draft_heads(loaded: LoadedModel, heads, cpu_fast_path: bool) -> tuple[DraftHeads | None, str | None]:
    """The drafter weights for `loaded`: "default" (the shipped heads of its alias), a folder, an
    object, or None; checked against the model's sizes and weights. Heads loaded from a folder
    run in bfloat16 where the CPU has native bfloat16 (drafts only propose; the target verifies
    in its own dtype, so the output is unchanged)."""
    from .cpu import fast_bfloat16

    if isinstance(heads, DraftHeads):
        heads.check_compatible(loaded.model, loaded.fingerprint)
        return heads, None
    if heads == "default":
        shipped = shipped_heads(loaded.alias)
        heads = str(shipped) if shipped else None
    if not heads:
        return None, None
    bf16 = cpu_fast_path and loaded.model.dtype == torch.float32 and fast_bfloat16()
    loaded_heads = load_heads(heads, dtype=torch.bfloat16 if bf16 else loaded.model.dtype, device=loaded.device)
    loaded_heads.check_compatible(loaded.model, loaded.fingerprint)
    return loaded_heads, str(heads)


def load(model: str = DEFAULT_MODEL, heads: str | None = "default", dtype: str = "auto",
         device: str | None = None, onednn: bool = True, offline: bool | None = None,
         eagle: str | Path | None = None) -> Decoder:
    """Load a target model and draft heads. heads="default" picks the shipped heads of a known
    alias (also when the model is given as a folder holding that alias's weights); other models
    have none unless a heads folder is given.

    dtype="auto" is bfloat16 on a CPU with native bfloat16 and float32 elsewhere
    (blockdraft.models.parse_dtype), and int4 there for a model whose weights are a 4-bit GGUF's
    codes (the default model: models.auto_weights); "int4" stores the decoder body's projections in 4 bits
    (blockdraft.int4; CPU, Llama family) and computes in bfloat16. Every method's output is
    exact against plain decoding at the dtype it resolves to (`dec.loaded.dtype_name`).

    offline=None reads only the local cache when the user set HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE;
    True always does; False allows hub downloads (blockdraft.models.load_model).

    onednn=True runs a CPU model's linear layers (float32; bfloat16 on native-bfloat16 CPUs) through oneDNN (blockdraft.cpu): the
    same math with kernels that are 1.4-2x faster here, for every method alike, HF generate
    included; masked attention runs on the grouped key/value heads (blockdraft.cpu.grouped_kv_sdpa).
    Both changes are made in place on the model this call loads (`dec.loaded.model`), whose
    packed weights replace the dense ones (one copy of the weights; a Llama-family model's q|k|v
    and gate|up packed fused, as the fast path runs them); `dec.release()` undoes them. Draft
    heads run in bfloat16 where the CPU has native bfloat16.
    eagle: an eagle drafter folder (default: the shipped one of a known alias), loaded and checked now.
    """
    from .cpu import attend_with_grouped_kv, use_onednn_linears
    from .fastpath import share_projections, unsupported

    loaded = load_model(model, dtype, device, offline)
    if dtype == "auto":
        loaded = dataclasses.replace(loaded, weights=auto_weights(loaded))
    cpu_fast_path = onednn and loaded.device.type == "cpu"
    draft_heads, path = _draft_heads(loaded, heads, cpu_fast_path)
    swapped, replaced = 0, None
    if loaded.weights == "int4":  # the body in 4 bits, with or without oneDNN for the rest
        reason = unsupported(loaded.model)
        if reason is not None:
            raise BlockdraftError(f"dtype 'int4' needs a Llama-family model on the CPU: {reason}")
        try:
            swapped = share_projections(loaded.model, int4=True)
        except ValueError as exc:
            raise BlockdraftError(f"dtype 'int4': {exc}") from None
    if cpu_fast_path:  # before the Decoder is built: its target reads the swapped layers
        swapped += share_projections(loaded.model) if loaded.weights is None else 0
        swapped += use_onednn_linears(loaded.model)
        replaced = attend_with_grouped_kv(loaded.model)
    dec = Decoder(loaded, draft_heads, path)
    dec.swapped_linears, dec.replaced_attention = swapped, replaced
    if eagle is not None:
        dec.use_eagle(eagle)
        dec.eagle()  # a wrong or broken folder fails here, in one line
    return dec
