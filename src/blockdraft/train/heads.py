"""Training draft heads by self-distillation on a frozen base model.

Data: the records written by `blockdraft distill`. For every answer position t (from the last
prompt token on) the base model's final hidden state h[t] comes from what `distill` kept while
generating; records without kept states (older folders) get theirs from one extra pass, cached
on disk (float16). Draft head j learns x[t+1+j] with cross-entropy through the frozen shared output
projection (equal head weights, as in the paper). AdamW, linear warm-up, cosine decay,
gradient clipping; a held-out split by sequence; checkpoints every epoch for --resume.

With a draft vocabulary (the default) the loss runs over its rows only, as drafting does:
3.5x cheaper per step on this CPU; targets outside it are skipped in the loss and counted as
misses in the held-out accuracy. Steps run under bfloat16 autocast (1.4x faster here).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import NamedTuple
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..corpus import MANIFEST as CORPUS_MANIFEST, Corpus
from ..errors import BlockdraftError
from ..heads import DraftHeads, HeadsConfig, following_ids
from ..jsonl import read_jsonl
from ..models import LoadedModel, cache_root, model_fingerprint
from .batching import length_batches, right_padded
from .distill import DATA_FILE, META_FILE, kept_hidden
from .schedule import StepPlan

IGNORE = -100


@dataclass(frozen=True)
class HeadsTrainConfig:
    num_heads: int = 4  # K draft heads
    epochs: int = 2
    lr: float = 2e-3  # peak learning rate after warm-up
    batch_positions: int = 512  # answer positions per optimiser step
    warmup: float = 0.05  # share of steps spent warming up
    weight_decay: float = 0.0
    clip: float = 1.0  # gradient-norm clip
    heldout: float = 0.05  # share of sequences held out for accuracy
    seed: int = 0
    max_tokens: int = 0  # use at most this many answer positions (0: all)
    max_seconds: float = 0  # time budget: the schedule shrinks to fit it (0: none)
    draft_vocab: int = 16384  # draft only the N most frequent answer tokens (0: the full vocabulary)
    chain: bool = False  # chained heads: head j also reads the j tokens before its target
    init: str = ""  # start from these trained heads (plain or chained) instead of zeros


@dataclass
class PositionData:
    hidden: torch.Tensor  # [N, H] float16, h[t] of each training position
    following: torch.Tensor  # [N, K+1] long, x[t+1..t+1+K], IGNORE past the answer's end
    sequences: int


class Projection:
    """The frozen output projection heads train through: all its rows, or the draft vocabulary's."""

    def __init__(self, full: torch.Tensor, vocab: torch.Tensor | None):
        self.full = full  # [V, H], also the chained heads' token embeddings
        self.vocab = vocab  # [V'] token id of each used row, or None for all rows
        self.rows = full if vocab is None else full[vocab].contiguous()  # [V', H]
        if vocab is not None:
            self._column = torch.full((full.shape[0],), IGNORE, dtype=torch.long, device=full.device)
            self._column[vocab] = torch.arange(len(vocab), device=full.device)

    def columns(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> row index in `rows` (IGNORE for IGNORE and for tokens outside the draft vocabulary)."""
        if self.vocab is None:
            return ids
        return torch.where(ids >= 0, self._column[ids.clamp(min=0)], IGNORE)

    def tokens(self, columns: torch.Tensor) -> torch.Tensor:
        return columns if self.vocab is None else self.vocab[columns]


class Sequence(NamedTuple):
    """One distilled record: what the heads train on."""
    ids: list[int]  # prompt + answer
    prompt_len: int
    source: str
    hidden_row: int = -1  # first row of its kept hidden states in the folder's hidden file (-1: none)


def load_sequences(data_dir: Path) -> tuple[list[Sequence], dict]:
    """The distilled records (prompt + answer ids, prompt length, source, kept-state row) and the meta.

    `data_dir` is a distillation folder or a corpus folder (corpus.py: ids only, no kept states).
    """
    if (Path(data_dir) / CORPUS_MANIFEST).exists():
        corpus = Corpus.open(data_dir)
        seqs = [Sequence(r.prompt_ids.tolist() + r.answer_ids.tolist(), len(r.prompt_ids), r.source)
                for r in corpus.records() if len(r.answer_ids)]
        if not seqs:
            raise BlockdraftError(f"corpus {data_dir} holds no records yet")
        return seqs, corpus.manifest
    meta_path = Path(data_dir) / META_FILE
    if not meta_path.exists():
        raise BlockdraftError(f"{data_dir} is not a distillation folder (no {META_FILE}); run `blockdraft distill`")
    def check(rec: dict) -> str | None:
        ok = isinstance(rec.get("prompt_ids"), list) and isinstance(rec.get("answer_ids"), list)
        return None if ok and rec["answer_ids"] else "missing or empty 'prompt_ids'/'answer_ids'"
    seqs = [Sequence(rec["prompt_ids"] + rec["answer_ids"], len(rec["prompt_ids"]), rec.get("source", ""),
                     rec["hidden_row"] if isinstance(rec.get("hidden_row"), int) else -1)
            for _, rec in read_jsonl(Path(data_dir) / DATA_FILE, check, on_error="skip")]
    if not seqs:
        raise BlockdraftError(f"{data_dir}/{DATA_FILE} holds no usable records")
    return seqs, json.loads(meta_path.read_text())


def draft_vocabulary(seqs: list, size: int) -> torch.Tensor:
    """The `size` most frequent answer tokens, most frequent first (ties: lower id first)."""
    counts: Counter[int] = Counter()
    for ids, prompt_len, *_ in seqs:
        counts.update(ids[prompt_len:])
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return torch.tensor([token for token, _ in ranked[:size]], dtype=torch.long)


def add_draft_vocab(heads_dir: str | Path, data_dir: str | Path, size: int) -> float:
    """Give saved heads a draft vocabulary from distillation data; returns the answer-token coverage."""
    from ..heads import load_heads

    heads = load_heads(heads_dir)
    seqs, _ = load_sequences(Path(data_dir))
    vocab = draft_vocabulary(seqs, size)
    heads.set_draft_vocab(vocab)
    coverage = vocab_coverage(seqs, vocab)
    heads.config.training["draft_vocab"] = {"size": len(vocab), "coverage": round(coverage, 4), "data": str(data_dir)}
    heads.save(heads_dir)
    return coverage


def vocab_coverage(seqs: list, vocab: torch.Tensor) -> float:
    keep = set(vocab.tolist())
    answers = [t for ids, prompt_len, *_ in seqs for t in ids[prompt_len:]]
    return sum(t in keep for t in answers) / max(1, len(answers))


@torch.inference_mode()
def hidden_states(loaded: LoadedModel, seqs: list[Sequence], data_dir: Path, batch_tokens: int = 0) -> torch.Tensor:
    """Final hidden state at every answer-predicting position, concatenated over sequences.

    Taken from the states `distill` kept where a record has them; the rest are computed in one
    pass under bfloat16 autocast (1.8x faster on this CPU; heads are drafts, so features that
    close to the float32 ones train heads just as well), stored as float16 and cached in
    `data_dir`. Batches of `batch_tokens` (0: 2,048 on a CPU, where bigger ones gain nothing,
    32,768 on a GPU).
    """
    batch_tokens = batch_tokens or (2048 if loaded.device.type == "cpu" else 32768)
    spans = [len(ids) - plen for ids, plen, *_ in seqs]  # positions plen-1 .. len-2
    total, size = sum(spans), loaded.model.config.hidden_size
    offsets = np.concatenate([[0], np.cumsum(spans)])
    kept = kept_hidden(data_dir, size)
    rows = [s.hidden_row for s in seqs]
    have = [kept is not None and 0 <= row and row + span <= len(kept) for row, span in zip(rows, spans)]
    if all(have):
        return torch.from_numpy(np.concatenate([kept[row:row + span] for row, span in zip(rows, spans)]))
    cache = _feature_cache(Path(data_dir), model_fingerprint(loaded.model))
    if cache.exists() and cache.stat().st_size == total * size * 2:
        return torch.from_numpy(np.fromfile(cache, dtype=np.float16).reshape(total, size))
    out = torch.empty((total, size), dtype=torch.float16)
    for i in (i for i, ok in enumerate(have) if ok):
        out[offsets[i]:offsets[i + 1]] = torch.from_numpy(np.array(kept[rows[i]:rows[i] + spans[i]]))
    missing = [i for i, ok in enumerate(have) if not ok]
    body, dev = loaded.model.get_decoder(), loaded.device
    with tqdm(total=int(sum(spans[i] for i in missing)), desc="hidden states", unit="tok") as bar:
        for group in length_batches([len(s[0]) for s in seqs], missing, batch_tokens):
            ids = right_padded([seqs[g][0] for g in group])
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                h = body(input_ids=ids.to(dev)).last_hidden_state.to("cpu", torch.float16)
            for r, g in enumerate(group):
                ids_g, plen = seqs[g][:2]
                out[offsets[g]:offsets[g + 1]] = h[r, plen - 1: len(ids_g) - 1]
            bar.update(int(sum(spans[g] for g in group)))
    cache.parent.mkdir(parents=True, exist_ok=True)
    out.numpy().tofile(cache)
    return out


def _feature_cache(data_dir: Path, fingerprint: str) -> Path:
    """Where recomputed states are kept: beside a distillation run, outside a (committed) corpus."""
    name = f"hidden-{fingerprint}-bf16.f16"
    manifest = data_dir / CORPUS_MANIFEST
    if manifest.exists():
        key = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
        return cache_root() / "features" / f"corpus-{key}" / name
    return data_dir / name


def following_tokens(seqs: list, num_heads: int) -> torch.Tensor:
    """[N, K+1]: row of position t holds x[t+1..t+1+K] (IGNORE past the sequence end).

    Column 0 is the base model's own next token (the chained heads' first input); column j is
    draft head j's target.
    """
    return torch.cat([following_ids(ids, plen - 1, len(ids) - plen, num_heads + 1, pad=IGNORE) for ids, plen, *_ in seqs])


def heldout_sequences(n: int, heldout: float, seed: int) -> set[int]:
    """Indices of the sequences held out from head training (also used to tune refiners)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return set(order[: max(1, int(n * heldout)) if n > 1 else 0])


def split_positions(seqs: list, heldout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Position indices of train and held-out sequences (split by sequence, not by token)."""
    spans = np.array([len(ids) - plen for ids, plen, *_ in seqs])
    offsets = np.concatenate([[0], np.cumsum(spans)])
    held = heldout_sequences(len(seqs), heldout, seed)
    pick = lambda keep: np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in range(len(seqs)) if (i in held) == keep] or [np.zeros(0, dtype=np.int64)])
    return pick(False), pick(True)


def head_losses(heads: DraftHeads, proj: Projection, hidden: torch.Tensor, following: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy per head [K] and the logits [B, K, V'] of one batch."""
    k = heads.num_heads
    before = proj.full[following[:, :k].clamp(min=0)] if heads.config.chain else None  # teacher forcing
    logits = heads(hidden, before) @ proj.rows.T  # [B, K, V']
    columns = proj.columns(following[:, 1:])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), columns.reshape(-1),
                           ignore_index=IGNORE, reduction="none").view(-1, k)
    valid = (columns != IGNORE).float()
    return (loss * valid).sum(0) / valid.sum(0).clamp(min=1), logits


@torch.no_grad()
def evaluate(heads: DraftHeads, proj: Projection, data: PositionData, idx: np.ndarray, batch: int) -> dict:
    """Per-head top-1 / top-5 accuracy (a target outside the draft vocabulary is a miss), loss, and
    `chain_accept`: draft tokens a greedy chain would keep per step (consecutive top-1 hits from head 1)."""
    k, dev = heads.num_heads, proj.full.device
    hits1, hits5, count, loss_sum = torch.zeros(k), torch.zeros(k), torch.zeros(k), torch.zeros(k)
    kept = 0
    for first in range(0, len(idx), batch):
        sel = torch.from_numpy(idx[first:first + batch])
        h, following = data.hidden[sel].to(dev, torch.float32), data.following[sel].to(dev)
        losses, logits = head_losses(heads, proj, h, following)
        top5 = proj.tokens(logits.topk(5, dim=-1).indices)  # [B, K, 5]
        tgt = following[:, 1:]
        valid = tgt != IGNORE
        top1 = (top5[..., 0] == tgt) & valid  # [B, K]
        hits1 += top1.sum(0).cpu()
        kept += int(top1.int().cumprod(1).sum())
        hits5 += ((top5 == tgt[..., None]).any(-1) & valid).sum(0).cpu()
        n = valid.sum(0).cpu()
        count += n
        loss_sum += losses.cpu() * n
    count = count.clamp(min=1)
    return {"top1": (hits1 / count).tolist(), "top5": (hits5 / count).tolist(), "loss": (loss_sum / count).tolist(),
            "chain_accept": kept / max(1, len(idx)), "positions": int(len(idx))}


def init_from(heads: DraftHeads, folder: str, model: torch.nn.Module, fingerprint: str) -> None:
    """Copy trained heads into new ones: each head's hidden-state weights; new token inputs start at zero.

    So plain heads seed chained heads that begin exactly as good as they were.
    """
    from ..heads import load_heads

    old = load_heads(folder)
    old.check_compatible(model, fingerprint)  # heads made for another model are refused, as everywhere
    with torch.no_grad():
        for new_block, old_block in zip(heads.blocks, old.blocks):
            width = min(new_block.in_features, old_block.in_features)
            new_block.weight[:, :width] = old_block.weight[:, :width].to(new_block.weight)
            new_block.bias.copy_(old_block.bias)


def _prepare_out(out: Path, resume: bool, fingerprint: str) -> Path:
    ckpt = out / "checkpoint.pt"
    if resume:
        if not ckpt.exists():
            raise BlockdraftError(f"--resume: no checkpoint at {ckpt}")
    elif out.exists() and any(out.iterdir()):
        raise BlockdraftError(f"{out} already holds another run; use a new --out folder or --resume")
    out.mkdir(parents=True, exist_ok=True)
    return ckpt


def train_heads(loaded: LoadedModel, data_dir: str | Path, out: str | Path, cfg: HeadsTrainConfig,
                resume: bool = False) -> tuple[DraftHeads, dict]:
    """Train K draft heads on distillation data; returns the heads and the held-out report."""
    out, data_dir = Path(out), Path(data_dir)
    fingerprint = model_fingerprint(loaded.model)
    ckpt_path = _prepare_out(out, resume, fingerprint)
    seqs, meta = load_sequences(data_dir)
    if meta.get("model_fingerprint") not in (None, fingerprint):
        raise BlockdraftError(f"{data_dir} was distilled from another model ({meta.get('model')}); distill again for this one")
    torch.manual_seed(cfg.seed)
    data = PositionData(hidden_states(loaded, seqs, data_dir),
                        following_tokens(seqs, cfg.num_heads), len(seqs))
    train_idx, held_idx = split_positions(seqs, cfg.heldout, cfg.seed)
    if cfg.max_tokens:
        train_idx = train_idx[: cfg.max_tokens]
    dev = loaded.device
    if dev.type == "cuda":  # a few GB at most: batches then gather on the GPU, not over PCIe
        data = PositionData(data.hidden.to(dev), data.following.to(dev), data.sequences)
    full = loaded.model.get_output_embeddings().weight.detach().to(torch.float32)  # [V, H], frozen
    vocab = draft_vocabulary(seqs, cfg.draft_vocab).to(dev) if cfg.draft_vocab else None
    proj = Projection(full, vocab)
    heads_cfg = HeadsConfig(num_heads=cfg.num_heads, hidden_size=full.shape[1], vocab_size=full.shape[0],
                            base_model=loaded.name, base_fingerprint=fingerprint, chain=cfg.chain)
    heads = DraftHeads(heads_cfg).to(dev)
    if cfg.init:
        init_from(heads, cfg.init, loaded.model, fingerprint)
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_positions)
    plan = StepPlan(steps_per_epoch * cfg.epochs, cfg.max_seconds, cfg.warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, plan.lr_factor)
    start_epoch, elapsed = 0, 0.0
    if resume:
        state = torch.load(ckpt_path, map_location=dev, weights_only=False)
        if state["fingerprint"] != fingerprint or state["config"] != asdict(cfg):
            raise BlockdraftError(f"{ckpt_path} was made for another model or configuration; cannot resume")
        heads.load_state_dict(state["heads"]); opt.load_state_dict(state["opt"]); sched.load_state_dict(state["sched"])
        start_epoch, elapsed, plan.total = state["epoch"], state["elapsed"], state["total"]
    gen = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(start_epoch):  # replay the shuffles so a resumed run sees the same order
        torch.randperm(len(train_idx), generator=gen)
    done = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        began = time.time()
        perm = train_idx[torch.randperm(len(train_idx), generator=gen).numpy()]
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step")
        for step in bar:
            if plan.finished(done):
                break
            sel = torch.from_numpy(perm[step * cfg.batch_positions:(step + 1) * cfg.batch_positions])
            h, following = data.hidden[sel].to(dev, torch.float32), data.following[sel].to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                losses, logits = head_losses(heads, proj, h, following)
            opt.zero_grad(set_to_none=True)
            losses.mean().backward()
            torch.nn.utils.clip_grad_norm_(heads.parameters(), cfg.clip)
            opt.step(); sched.step()
            done += 1
            plan.tick(done - start_epoch * steps_per_epoch)
            if step % 20 == 0:
                tgt = following[:, 1:]
                acc = ((proj.tokens(logits.argmax(-1)) == tgt) & (tgt != IGNORE)).float().sum(0) / (tgt != IGNORE).float().sum(0).clamp(min=1)
                bar.set_postfix(loss=f"{losses.mean().item():.3f}", top1="/".join(f"{a:.2f}" for a in acc.tolist()))
        bar.close()
        elapsed += time.time() - began
        torch.save({"heads": heads.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "total": plan.total,
                    "epoch": epoch + 1, "elapsed": elapsed, "fingerprint": fingerprint, "config": asdict(cfg)}, ckpt_path)
        if plan.finished(done):
            break
    report = evaluate(heads, proj, data, held_idx, cfg.batch_positions)
    sources = sorted({s.source for s in seqs if s.source})
    if vocab is not None:
        heads.set_draft_vocab(vocab)
    heads.config.training = {
        "data": str(data_dir), "sources": sources, "sequences": len(seqs), "train_positions": int(len(train_idx)),
        "heldout_positions": report["positions"], "epochs": round(done / steps_per_epoch, 2), "steps": done, "seed": cfg.seed, "config": asdict(cfg),
        "train_seconds": round(elapsed, 1), "device": str(dev), "heldout_top1": report["top1"],
        "heldout_top5": report["top5"], "heldout_loss": report["loss"], "heldout_chain_accept": round(report["chain_accept"], 4),
        "init": cfg.init or None, "distill": meta,
        "draft_vocab": {"size": cfg.draft_vocab, "coverage": round(vocab_coverage(seqs, heads.draft_vocab), 4)} if cfg.draft_vocab else None,
    }
    heads.save(out)
    return heads, report
