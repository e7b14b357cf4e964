"""The training corpus kept in the repository: self-distilled answers as compact token ids.

Distillation is the expensive part of training a drafter on a CPU (~90 answer tokens/s), and
run folders do not survive a fresh clone, so finished answers are packed into shards that are
committed and only ever appended to. A corpus folder holds

    manifest.json       model, its fingerprint, generation settings, the first run's dtype; per
                        shard: file, sha256, records, answer and prompt tokens, domains,
                        sources + licences, and the dtype that generated it
    shard-00000.npz     compressed arrays: record ids, domains, sources; prompt and answer ids
                        (uint16, concatenated) with their offsets

Runs of one model at different dtypes extend one corpus (each shard names its dtype): its
bfloat16 answers distil ~1.85x faster than float32's here and are as good labels for the
4-bit default, whose teacher-forced argmax agrees with them as often (docs/research.md).
Hidden states are never stored: training recomputes them from the ids in one teacher-forced
forward. A shard is written to a temporary name and renamed before the manifest names it, so
a crash leaves at most an unnamed file, never a manifest that points at a partial shard.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import BlockdraftError

FORMAT = 1
MANIFEST = "manifest.json"
TOKEN_DTYPE = np.uint16  # the vocabularies we serve (49,152 for SmolLM2) fit in 16 bits
# Settings that must agree between a corpus and the run that extends it (the dtype may differ:
# it is recorded per shard).
IDENTITY_KEYS = ("model_fingerprint", "generation")


@dataclass(frozen=True)
class CorpusRecord:
    """One distilled answer: the chat-formatted prompt ids and the model's greedy answer ids."""

    id: str  # the prompt's id in its training-prompt file ("<source>/<file>:<index>")
    domain: str
    source: str
    prompt_ids: np.ndarray  # [P] uint16
    answer_ids: np.ndarray  # [A] uint16, ending with the first end-of-turn token (or cut at the budget)


class Corpus:
    """A corpus folder: read its records, append shards; every fault is one line naming the file."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._ids: set[str] | None = None  # record ids, read from the shards once, kept up to date by append

    # --- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> "Corpus":
        path = Path(path)
        file = path / MANIFEST
        if not file.is_file():
            raise BlockdraftError(f"{path} is not a corpus folder (no {MANIFEST}); create one with `blockdraft corpus add`")
        try:
            manifest = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BlockdraftError(f"{file}: not valid JSON ({exc})") from None
        problem = _manifest_problem(manifest)
        if problem:
            raise BlockdraftError(f"{file}: {problem}")
        return cls(path, manifest)

    @classmethod
    def create_or_open(cls, path: str | Path, identity: dict) -> "Corpus":
        """Open the corpus at `path`, refusing one made by another model or with other settings.

        `identity` holds model, model_fingerprint, dtype, vocab_size and generation; a new folder
        gets a manifest with no shards.
        """
        path = Path(path)
        if (path / MANIFEST).exists():
            corpus = cls.open(path)
            corpus.check_identity(identity)
            return corpus
        if path.exists() and not path.is_dir():
            raise BlockdraftError(f"corpus path {path} is a file, not a folder")
        if identity.get("vocab_size", 0) > np.iinfo(TOKEN_DTYPE).max + 1:
            raise BlockdraftError(f"vocabulary of {identity['vocab_size']} ids does not fit the corpus' 16-bit ids")
        manifest = {"format": FORMAT, **identity, "token_dtype": np.dtype(TOKEN_DTYPE).name, "shards": []}
        path.mkdir(parents=True, exist_ok=True)
        corpus = cls(path, manifest)
        corpus._write_manifest()
        return corpus

    def check_identity(self, identity: dict) -> None:
        for key in IDENTITY_KEYS:
            if key in identity and self.manifest.get(key) != identity[key]:
                raise BlockdraftError(
                    f"{self.path} holds a corpus with {key}={json.dumps(self.manifest.get(key))}, "
                    f"not {json.dumps(identity[key])}: use another corpus folder")

    # --- reading -------------------------------------------------------------------------

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    def answer_tokens(self) -> int:
        return sum(s["answer_tokens"] for s in self.shards)

    def shard_dtype(self, shard: dict) -> str:
        """The dtype whose greedy answers a shard holds (shards that name none: the manifest's)."""
        return shard.get("dtype", self.manifest["dtype"])

    def record_ids(self) -> set[str]:
        if self._ids is None:
            self._ids = {rid for shard in self.shards for rid in self._load(shard)["ids"].tolist()}
        return set(self._ids)

    def records(self) -> Iterator[CorpusRecord]:
        for shard in self.shards:
            arrays = self._load(shard)
            po, ao = arrays["prompt_offsets"], arrays["answer_offsets"]
            pt, at = arrays["prompt_tokens"], arrays["answer_tokens"]
            for i, (rid, domain, source) in enumerate(zip(arrays["ids"], arrays["domains"], arrays["sources"])):
                yield CorpusRecord(str(rid), str(domain), str(source), pt[po[i]:po[i + 1]], at[ao[i]:ao[i + 1]])

    def _load(self, shard: dict) -> dict[str, np.ndarray]:
        file = self.path / shard["file"]
        if not file.is_file():
            raise BlockdraftError(f"{file}: shard named in {MANIFEST} is missing")
        data = file.read_bytes()
        if hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise BlockdraftError(f"{file}: corrupt or truncated shard (sha256 differs from {MANIFEST})")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except (ValueError, OSError, EOFError) as exc:
            raise BlockdraftError(f"{file}: unreadable shard ({exc})") from None
        problem = _shard_problem(arrays, shard, self.manifest.get("vocab_size"))
        if problem:
            raise BlockdraftError(f"{file}: {problem}")
        return arrays

    # --- appending -----------------------------------------------------------------------

    def append(self, records: Iterable[CorpusRecord], licences: dict[str, str], dtype: str | None = None) -> dict | None:
        """Pack `records` into one new shard (records already in the corpus are dropped).

        Committed shards are never rewritten; returns the new shard's manifest entry, or None
        when nothing was new. `licences` maps a source to its licence text; `dtype` names the
        dtype that generated the answers (default: the manifest's).
        """
        known = self.record_ids()
        fresh = [r for r in records if r.id not in known and len(r.answer_ids)]
        if not fresh:
            return None
        vocab = self.manifest.get("vocab_size") or np.iinfo(TOKEN_DTYPE).max + 1
        for r in fresh:
            for ids in (r.prompt_ids, r.answer_ids):
                if len(ids) and (int(np.min(ids)) < 0 or int(np.max(ids)) >= vocab):
                    raise BlockdraftError(f"record {r.id}: token ids outside the vocabulary of {vocab}")
        arrays = {
            "ids": np.array([r.id for r in fresh]),
            "domains": np.array([r.domain for r in fresh]),
            "sources": np.array([r.source for r in fresh]),
            "prompt_tokens": np.concatenate([np.asarray(r.prompt_ids, dtype=TOKEN_DTYPE) for r in fresh]),
            "prompt_offsets": np.concatenate([[0], np.cumsum([len(r.prompt_ids) for r in fresh])]).astype(np.int64),
            "answer_tokens": np.concatenate([np.asarray(r.answer_ids, dtype=TOKEN_DTYPE) for r in fresh]),
            "answer_offsets": np.concatenate([[0], np.cumsum([len(r.answer_ids) for r in fresh])]).astype(np.int64),
        }
        name = f"shard-{len(self.shards):05d}.npz"
        while (self.path / name).exists():  # a file no manifest names (a crash before the manifest)
            name = f"shard-{len(self.shards):05d}-{os.urandom(3).hex()}.npz"
        tmp = self.path / (name + ".partial")
        with tmp.open("wb") as handle:
            np.savez_compressed(handle, **arrays)
        tmp.replace(self.path / name)
        sources = Counter(r.source for r in fresh)
        entry = {
            "file": name,
            "sha256": hashlib.sha256((self.path / name).read_bytes()).hexdigest(),
            "records": len(fresh),
            "answer_tokens": int(len(arrays["answer_tokens"])),
            "prompt_tokens": int(len(arrays["prompt_tokens"])),
            "domains": dict(sorted(Counter(r.domain for r in fresh).items())),
            "sources": {s: {"records": n, "license": licences.get(s, "unknown")} for s, n in sorted(sources.items())},
            "dtype": dtype or self.manifest["dtype"],
        }
        self.manifest["shards"].append(entry)
        self._write_manifest()
        self._ids = known | {r.id for r in fresh}
        return entry

    def _write_manifest(self) -> None:
        tmp = self.path / (MANIFEST + ".partial")
        tmp.write_text(json.dumps(self.manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(self.path / MANIFEST)

    def summary(self) -> dict:
        domains: Counter[str] = Counter()
        by_dtype: Counter[str] = Counter()
        for shard in self.shards:
            domains.update(shard["domains"])
            by_dtype[self.shard_dtype(shard)] += shard["answer_tokens"]
        return {"path": str(self.path), "model": self.manifest.get("model"), "answer_tokens_by_dtype": dict(sorted(by_dtype.items())),
                "shards": len(self.shards), "records": sum(s["records"] for s in self.shards),
                "answer_tokens": self.answer_tokens(),
                "prompt_tokens": sum(s["prompt_tokens"] for s in self.shards), "domains": dict(sorted(domains.items()))}


def _manifest_problem(manifest: object) -> str | None:
    if not isinstance(manifest, dict):
        return "manifest is not a JSON object"
    if manifest.get("format") != FORMAT:
        return f"unknown corpus format {manifest.get('format')!r} (this version reads {FORMAT})"
    for key, kind in (("model_fingerprint", str), ("dtype", str), ("generation", dict), ("shards", list)):
        if not isinstance(manifest.get(key), kind):
            return f"field {key!r} missing or not a {kind.__name__}"
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict) or not all(isinstance(shard.get(k), t) for k, t in
                                                   (("file", str), ("sha256", str), ("records", int),
                                                    ("answer_tokens", int), ("prompt_tokens", int), ("domains", dict))):
            return f"shard entry {i} is malformed"
        if not isinstance(shard.get("dtype", ""), str):
            return f"shard entry {i} has a malformed dtype"
        if "/" in shard["file"] or shard["file"].startswith("."):
            return f"shard entry {i} names a file outside the corpus folder"
    return None


def _shard_problem(arrays: dict[str, np.ndarray], shard: dict, vocab: int | None) -> str | None:
    needed = ("ids", "domains", "sources", "prompt_tokens", "prompt_offsets", "answer_tokens", "answer_offsets")
    missing = [k for k in needed if k not in arrays]
    if missing:
        return f"shard lacks arrays {', '.join(missing)}"
    n = len(arrays["ids"])
    if n != shard["records"] or len(arrays["domains"]) != n or len(arrays["sources"]) != n:
        return f"shard holds {n} records, the manifest says {shard['records']}"
    for kind in ("prompt", "answer"):
        tokens, offsets = arrays[f"{kind}_tokens"], arrays[f"{kind}_offsets"]
        if tokens.dtype != TOKEN_DTYPE:
            return f"{kind} ids are {tokens.dtype}, not {np.dtype(TOKEN_DTYPE).name}"
        if len(offsets) != n + 1 or offsets[0] != 0 or offsets[-1] != len(tokens) or np.any(np.diff(offsets) < 0):
            return f"{kind} offsets do not match its ids"
        if vocab and len(tokens) and int(tokens.max()) >= vocab:
            return f"{kind} ids outside the vocabulary of {vocab}"
    return None
