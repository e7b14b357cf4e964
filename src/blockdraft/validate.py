"""Load-time checks of the files a user hands blockdraft (heads, n-gram LMs, rescorers, models).

A corrupt or mismatched file must fail when it is loaded, in one line that names the file and
the fault, not steps later as an IndexError, a NaN in a lattice or an AttributeError. The
checks here are the ones a loader cannot get from its libraries: JSON that is an object, config
fields of the declared types and ranges, finite weights, ids inside the vocabulary, and
safetensors files whose header covers the file.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from .errors import BlockdraftError

C = TypeVar("C")


def fault(path: str | Path, what: str) -> BlockdraftError:
    """The one-line error for a bad file: `corrupt FILE: WHAT`."""
    return BlockdraftError(f"corrupt {path}: {what}")


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message as one short line (library messages often span several)."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def checkpoint_config(folder: Path, config_file: str, weights_file: str, kind: str, what: str) -> dict:
    """The config of a saved checkpoint folder (config JSON + safetensors weights) of format
    `kind`, without its "format" key; a missing file or another format is one line."""
    if not (folder / config_file).exists() or not (folder / weights_file).exists():
        raise BlockdraftError(f"no {what} at {folder}: expected {config_file} and {weights_file}")
    raw = json_object(folder / config_file)
    found = raw.pop("format", None)
    if found != kind:
        raise fault(folder / config_file, f"format {found!r}, expected {kind!r}")
    return raw


def json_object(path: str | Path) -> dict:
    """The JSON object in `path`; a missing, binary or non-JSON file, or JSON that is not an object
    (null, a number, a string, a list), is a one-line error."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise BlockdraftError(f"cannot read {path}: {first_line(exc)}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise fault(path, f"not a JSON file ({first_line(exc, 120)})") from None
    if not isinstance(raw, dict):
        raise fault(path, f"expected a JSON object, found {json.dumps(raw)[:40]}")
    return raw


def number_at_least(value: Any, low: float) -> bool:
    """A finite JSON number (not a bool) >= low."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value)) and value >= low


def _type_ok(value: Any, kind: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
    if kind in (str, dict, list):
        return isinstance(value, kind)
    origin = typing.get_origin(kind)
    return _type_ok(value, origin) if origin in (dict, list) else True


def config_from(cls: type[C], raw: dict, path: str | Path, positive: tuple[str, ...] = (),
                non_negative: tuple[str, ...] = ()) -> C:
    """A config dataclass from a JSON object: every key known, every value of its field's type,
    the named integer fields > 0 (or >= 0); required fields present."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        if key not in fields:
            raise fault(path, f"unknown field {key!r}")
        if not _type_ok(value, hints[key]):
            kind = getattr(hints[key], "__name__", str(hints[key]))
            raise fault(path, f"{key} must be {kind}, found {json.dumps(value)[:40]}")
    for key, field in fields.items():
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if required and key not in raw:
            raise fault(path, f"missing field {key!r}")
    for key in positive:
        if key in raw and raw[key] <= 0:
            raise fault(path, f"{key} must be positive, found {raw[key]}")
    for key in non_negative:
        if key in raw and raw[key] < 0:
            raise fault(path, f"{key} must be >= 0, found {raw[key]}")
    return cls(**raw)


def safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated or foreign file is a one-line error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise fault(path, f"not a complete safetensors file ({first_line(exc, 120)})") from None


def safetensors_header(path: str | Path) -> None:
    """Read only a safetensors file's header: catches truncated files without loading the weights."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise fault(path, f"not a complete safetensors file ({first_line(exc, 120)})") from None


def finite(tensors: typing.Iterable[tuple[str, torch.Tensor]], path: str | Path) -> None:
    """Every floating tensor free of NaN and inf (a NaN weight turns every draft into noise, or a crash)."""
    for name, tensor in tensors:
        if not tensor.is_floating_point() or bool(torch.isfinite(tensor.detach().sum(dtype=torch.float32))):
            continue  # one reduction per tensor (a NaN or inf makes the sum so); an overflowing sum is confirmed below
        if not bool(torch.isfinite(tensor).all()):
            what = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
            raise fault(path, f"{name} holds {what} values")


def ids_in_range(ids: torch.Tensor | np.ndarray, size: int, path: str | Path, name: str) -> None:
    """Token ids inside [0, size): an id past the vocabulary would be an IndexError at generation."""
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= size):
        bad = int(ids.max()) if int(ids.max()) >= size else int(ids.min())
        raise fault(path, f"{name} holds token id {bad}, outside the {size}-token vocabulary")


def model_folder(folder: str | Path) -> None:
    """A local model folder's config.json is a JSON object and its safetensors files are complete."""
    folder = Path(folder)
    if (folder / "config.json").exists():
        json_object(folder / "config.json")
    for weights in sorted(folder.glob("*.safetensors")):
        safetensors_header(weights)


def matching_state(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """The saved tensors are exactly the module's (names and shapes), said in one line, not
    load_state_dict's multi-line report."""
    want = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    missing = sorted(set(want) - set(state))
    if missing:
        raise fault(path, f"missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(set(state) - set(want))
    if extra:
        raise fault(path, f"unexpected tensor {extra[0]!r} (the config describes another layout)")
    for name, shape in want.items():
        if tuple(state[name].shape) != shape:
            raise fault(path, f"{name} has shape {list(state[name].shape)}, the config needs {list(shape)}")


def drafter_state(module: torch.nn.Module, state: dict[str, torch.Tensor], vocab_size: int, path: str | Path) -> None:
    """A drafter's saved tensors: its layout, finite weights, draft-vocabulary ids inside the vocabulary."""
    matching_state(module, state, path)
    finite(state.items(), path)
    vocab = state.get("draft_vocab")
    if vocab is not None:
        if vocab.is_floating_point() or vocab.dtype == torch.bool:
            raise fault(path, f"draft_vocab must hold integer token ids, found {vocab.dtype}")
        ids_in_range(vocab, vocab_size, path, "draft_vocab")


def model_spec(spec: object) -> str:
    """A model name or path the loaders can take: a non-empty string the file system accepts as a
    path (a 5,000-character name is ENAMETOOLONG there, a traceback unless caught here)."""
    if not isinstance(spec, str) or not spec.strip():
        raise BlockdraftError(f"model must be a non-empty name or path, got {spec!r}"[:120])
    try:
        Path(spec).expanduser().exists()
    except (OSError, ValueError) as exc:
        raise BlockdraftError(f"cannot load model {shorten(spec)!r}: not a usable path ({getattr(exc, 'strerror', None) or first_line(exc, 80)})") from None
    return spec


def shorten(text: str, limit: int = 80) -> str:
    """A user's string cut for a one-line message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
