"""The target's fused features over the committed corpus: what the `eagle` drafter trains on.

Features are never committed: they are recomputed from the corpus ids by teacher-forced
forwards (the answers are the model's own greedy ones, so the next corpus token is the
target's choice at every answer position) and cached on disk, keyed by the model's
fingerprint, the layers and the records chosen. One pass under bfloat16 autocast (the features
only shape drafts; verification stays exact), stored as float16.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..corpus import Corpus, CorpusRecord
from ..errors import BlockdraftError
from ..models import LoadedModel, model_fingerprint
from .batching import length_batches, right_padded


@dataclass
class FeatureSet:
    """Token sequences (prompt + answer) and the features of every position but the last."""

    ids: list[np.ndarray]  # per sequence [T] int64
    prompt_lens: list[int]
    domains: list[str]
    offsets: np.ndarray  # [S + 1]: sequence i's features are rows offsets[i]:offsets[i + 1] (T - 1 rows)
    features: np.ndarray  # [rows, len(layers) * H] float16 (a memory map when read from the cache)

    def __len__(self) -> int:
        return len(self.ids)

    def of(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.features[self.offsets[i]:self.offsets[i + 1]]))


def pick_records(corpus: Corpus, max_records: int, max_tokens: int) -> list[CorpusRecord]:
    """Up to `max_records` records of at most `max_tokens` tokens, spread over the shards' order
    evenly (every domain the corpus holds, in its proportions)."""
    fitting = [r for r in corpus.records() if len(r.prompt_ids) + len(r.answer_ids) <= max_tokens and len(r.answer_ids) > 2]
    if not fitting:
        raise BlockdraftError(f"no corpus record fits in {max_tokens} tokens")
    if len(fitting) <= max_records:
        return fitting
    keep = np.linspace(0, len(fitting) - 1, max_records).round().astype(int)
    return [fitting[i] for i in keep]


@torch.inference_mode()
def corpus_features(loaded: LoadedModel, records: list[CorpusRecord], layers: tuple[int, ...], cache_dir: Path,
                    batch_tokens: int = 4096) -> FeatureSet:
    """Features of `layers` (decoder layer outputs, concatenated) at every position of every record."""
    ids = [np.concatenate([r.prompt_ids, r.answer_ids]).astype(np.int64) for r in records]
    rows = np.array([len(x) - 1 for x in ids])
    offsets = np.concatenate([[0], np.cumsum(rows)])
    width = len(layers) * loaded.model.config.hidden_size
    key = hashlib.sha256(json.dumps([model_fingerprint(loaded.model), list(layers), [r.id for r in records]]).encode())
    path = cache_dir / f"eagle-features-{key.hexdigest()[:16]}.f16"
    out = FeatureSet(ids, [len(r.prompt_ids) for r in records], [r.domain for r in records], offsets, np.empty(0))
    if path.exists() and path.stat().st_size == offsets[-1] * width * 2:
        out.features = np.memmap(path, dtype=np.float16, mode="r", shape=(int(offsets[-1]), width))
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    feats = np.memmap(partial, dtype=np.float16, mode="w+", shape=(int(offsets[-1]), width))
    body, dev = loaded.model.get_decoder(), loaded.device
    with tqdm(total=int(offsets[-1]), desc="eagle features", unit="tok") as bar:
        for group in length_batches([len(x) for x in ids], list(range(len(ids))), batch_tokens):
            batch = right_padded([ids[g] for g in group])
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                states = body(input_ids=batch.to(dev), output_hidden_states=True).hidden_states
            fused = torch.cat([states[k + 1] for k in layers], -1).to("cpu", torch.float16)
            for r, g in enumerate(group):
                feats[offsets[g]:offsets[g + 1]] = fused[r, : rows[g]].numpy()
            bar.update(int(sum(rows[g] for g in group)))
    feats.flush()
    del feats
    partial.rename(path)
    out.features = np.memmap(path, dtype=np.float16, mode="r", shape=(int(offsets[-1]), width))
    return out
