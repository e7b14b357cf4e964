"""Training the `eagle` draft layer on the committed corpus, with training-time test.

Data: blockdraft.train.eagle_features (the target's fused features, recomputed from the corpus
ids). Step 0 reads the target's features at every position, as drafting reads committed
positions; step j (up to `unroll - 1`) reads, at position s, the layer's own step-(j-1) output
at s - 1, and attends to the target-feature keys up to s - j and its own keys along the drafted
chain: exactly what drafting the (j+1)-th token of a block sees (EAGLE-3's training-time test).
Every step predicts x[s+2] (the token after the next) over the draft vocabulary; tokens outside
it are skipped in the loss and counted as misses in the held-out accuracy. Loss on answer
positions only (drafting starts at the prompt's last token), step j weighted 0.8^j.
"""
from __future__ import annotations

import random
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..corpus import Corpus
from ..eagle.model import (EagleConfig, EagleLayer, default_layers, draft_vocabulary, load_eagle, median_feature_rms,
                           save_eagle)
from ..errors import BlockdraftError
from ..models import LoadedModel, cache_root, model_fingerprint
from .batching import length_batches
from .eagle_features import FeatureSet, corpus_features, pick_records
from .schedule import StepPlan

IGNORE = -100
STEP_WEIGHT = 0.8


@dataclass
class EagleTrainConfig:
    draft_vocab: int = 8192
    intermediate_size: int = 1536
    unroll: int = 3  # training-time test steps (1: teacher-forced features only)
    epochs: float = 1.0
    lr: float = 1e-3
    warmup: float = 0.03  # share of steps spent warming up
    batch_tokens: int = 4096
    max_records: int = 3000
    # records longer than this (prompt + answer) are left out; long enough for the long reads
    # users ask about (Spec-Bench summarization and rag turns: 700-1,500 tokens)
    max_tokens: int = 1536
    heldout: float = 0.03
    max_seconds: float = 0.0  # time budget: the schedule shrinks to fit it (0: none)
    seed: int = 0


def _batch(data: FeatureSet, group: list[int], t2d: torch.Tensor):
    """Features [B, T, F], next tokens [B, T] (x[s+1]), labels [B, T] (draft ids of x[s+2]), and the
    loss mask of step 0 [B, T] (s >= prompt length - 1 and x[s+2] inside the sequence)."""
    rows = max(data.offsets[g + 1] - data.offsets[g] for g in group)
    width = data.features.shape[1]
    feats = torch.zeros(len(group), rows, width, dtype=torch.float16)
    nxt = torch.zeros(len(group), rows, dtype=torch.long)
    labels = torch.full((len(group), rows), IGNORE, dtype=torch.long)
    valid = torch.zeros(len(group), rows, dtype=torch.bool)
    for r, g in enumerate(group):
        ids = torch.from_numpy(data.ids[g])
        n = len(ids) - 1
        feats[r, :n] = data.of(g)
        nxt[r, :n] = ids[1:]
        labels[r, : n - 1] = t2d[ids[2:]]
        valid[r, max(0, data.prompt_lens[g] - 1): n - 1] = True
    return feats, nxt, labels, valid


def ttt_outputs(layer: EagleLayer, embed: torch.Tensor, feats: torch.Tensor, nxt: torch.Tensor, unroll: int):
    """The layer's output of each training-time-test step [B, T, H], step 0 first: step j at s
    is what drafting the (j+1)-th token of a block that starts after position s - j computes."""
    t = nxt.shape[1]
    pos = torch.arange(t)
    emb = embed[nxt].to(layer.fc.weight.dtype)
    g = out = layer.fuse(feats)
    keys, values = [], []
    for j in range(unroll):
        allowed = past = None
        if j:  # own output at s - 1; target keys up to s - j, own keys of step i at s - j + i
            g = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], 1)
            blocks = [pos[None, :] <= pos[:, None] - j] + [pos[None, :] == pos[:, None] - j + i for i in range(1, j + 1)]
            allowed = torch.cat(blocks, 1)
            past = (torch.cat(keys, 2), torch.cat(values, 2))
        out, k, v = layer(g, emb, pos, past, allowed)
        keys.append(k)
        values.append(v)
        yield out


def ttt_losses(layer: EagleLayer, embed: torch.Tensor, feats: torch.Tensor, nxt: torch.Tensor, labels: torch.Tensor,
               valid: torch.Tensor, unroll: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The weighted loss over `unroll` steps and, per step, (correct top-1, positions)."""
    total, counts = 0.0, []
    for j, out in enumerate(ttt_outputs(layer, embed, feats, nxt, unroll)):
        mask = valid
        if j:  # the block starts at s - j, which must itself be an answer-drafting position
            mask = torch.zeros_like(valid)
            mask[:, j:] = valid[:, :-j] & valid[:, j:]
        logits = layer.logits(out[mask]).float()
        target = labels[mask]
        total = total + STEP_WEIGHT ** j * F.cross_entropy(logits, target, ignore_index=IGNORE)
        counts.append((int((logits.argmax(-1) == target).sum()), int(mask.sum())))
    return total, counts


def new_layer(loaded: LoadedModel, data: FeatureSet, train_idx: list[int], layers: list[int], cfg: EagleTrainConfig
              ) -> EagleLayer:
    """A fresh layer: draft vocabulary = the most frequent answer tokens; lm_head and norm start
    from the target's own rows and final norm (the fused features live in its hidden space)."""
    model = loaded.model
    mc = model.config
    counts = torch.zeros(mc.vocab_size, dtype=torch.long)
    for i in train_idx:
        counts += torch.bincount(torch.from_numpy(data.ids[i][data.prompt_lens[i]:]), minlength=mc.vocab_size)
    d2t = draft_vocabulary(counts, cfg.draft_vocab)
    config = EagleConfig(hidden_size=mc.hidden_size, vocab_size=mc.vocab_size, target_layers=list(layers),
                         draft_vocab_size=len(d2t), num_attention_heads=mc.num_attention_heads,
                         num_key_value_heads=mc.num_key_value_heads, intermediate_size=cfg.intermediate_size,
                         rope_theta=float(getattr(mc, "rope_theta", 100000.0)), rms_norm_eps=float(mc.rms_norm_eps),
                         fc_norm=True,
                         base_model=loaded.label, base_fingerprint=model_fingerprint(model))
    layer = EagleLayer(config)
    with torch.no_grad():
        layer.d2t.copy_(d2t)
        layer.lm_head.weight.copy_(model.get_output_embeddings().weight[d2t + torch.arange(len(d2t))].float())
        layer.norm.weight.copy_(model.get_decoder().norm.weight.float())
    return layer


def train_eagle(loaded: LoadedModel, corpus_dir: str | Path, out: str | Path, cfg: EagleTrainConfig,
                init: str | Path | None = None) -> dict:
    """Train (or, from `init`, go on training) the eagle layer; saves to `out`, returns the summary."""
    corpus = Corpus.open(corpus_dir)
    corpus.check_identity({"model_fingerprint": model_fingerprint(loaded.model)} | {
        k: corpus.manifest[k] for k in ("dtype", "generation")})
    torch.manual_seed(cfg.seed)
    layer = load_eagle(init) if init else None
    if layer is not None:
        layer.check_compatible(loaded.model, model_fingerprint(loaded.model))
    layers = layer.config.target_layers if layer else default_layers(loaded.model.config.num_hidden_layers)
    records = pick_records(corpus, cfg.max_records, cfg.max_tokens)
    data = corpus_features(loaded, records, tuple(layers), cache_root() / "eagle-features")
    rng = random.Random(cfg.seed)
    held = [i for i, r in enumerate(records) if is_heldout(r.id, cfg.heldout)] or [0]
    train_idx = sorted(set(range(len(data))) - set(held))
    if layer is None:
        layer = new_layer(loaded, data, train_idx, layers, cfg)
    layer.train().requires_grad_(True)
    t2d = torch.full((layer.config.vocab_size,), IGNORE, dtype=torch.long)
    t2d[layer.target_ids(torch.arange(layer.config.draft_vocab_size))] = torch.arange(layer.config.draft_vocab_size)
    embed = loaded.model.get_input_embeddings().weight.detach().float()
    lengths = [len(x) for x in data.ids]
    batches = length_batches(lengths, train_idx, cfg.batch_tokens)
    steps = max(1, int(len(batches) * cfg.epochs))
    params = list(layer.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    began, done = time.perf_counter(), 0
    plan = StepPlan(steps, cfg.max_seconds, cfg.warmup)
    bar = tqdm(total=steps, desc="train eagle", unit="batch")
    order: list[list[int]] = []
    while not plan.finished(done):
        if not order:
            order = batches[:]
            rng.shuffle(order)
        group = order.pop()
        for pg in opt.param_groups:
            pg["lr"] = cfg.lr * plan.lr_factor(done)
        feats, nxt, labels, valid = _batch(data, group, t2d)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, counts = ttt_losses(layer, embed, feats.float(), nxt, labels, valid, cfg.unroll)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        done += 1
        plan.tick(done)
        bar.total = plan.total
        bar.update()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc0=f"{counts[0][0] / max(1, counts[0][1]):.3f}")
    bar.close()
    seconds = time.perf_counter() - began
    accuracy = evaluate(layer, embed, data, held, t2d, cfg)
    rows = np.linspace(0, len(data.features) - 1, min(len(data.features), 65_536)).astype(np.int64)
    layer.config.feature_rms = median_feature_rms(torch.from_numpy(np.asarray(data.features[rows])), len(layers))
    previous = dict(layer.config.training)
    layer.config.training = {
        "corpus_answers": len(data), "corpus_positions": int(data.offsets[-1]),
        "corpus_answer_tokens_total": corpus.answer_tokens(), "epochs": round(done / len(batches), 3),
        "seconds": round(seconds, 1), "heldout_sequences": len(held), "heldout_top1_by_step": accuracy,
        "config": asdict(cfg), "before": previous or None}
    save_eagle(layer.eval(), out)
    return layer.config.training


def is_heldout(record_id: str, share: float) -> bool:
    """Whether an answer is held out: decided by its prompt id alone, so the split stays the same
    when the corpus grows or training resumes from a drafter trained on the same split."""
    return zlib.crc32(record_id.encode()) % 10_000 < share * 10_000


@torch.no_grad()
def evaluate(layer: EagleLayer, embed: torch.Tensor, data: FeatureSet, held: list[int], t2d: torch.Tensor,
             cfg: EagleTrainConfig) -> list[float]:
    """Held-out top-1 accuracy of each drafted token (step j = the (j+1)-th token after the next)."""
    layer.eval()
    right, total = [0] * cfg.unroll, [0] * cfg.unroll
    for group in length_batches([len(x) for x in data.ids], held, cfg.batch_tokens):
        feats, nxt, labels, valid = _batch(data, group, t2d)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, counts = ttt_losses(layer, embed, feats.float(), nxt, labels, valid, cfg.unroll)
        for j, (c, n) in enumerate(counts):
            right[j] += c
            total[j] += n
    if not any(total):
        raise BlockdraftError("no held-out answer positions to evaluate")
    return [round(r / max(1, n), 4) for r, n in zip(right, total)]


def chain_acceptance(top1: list[float]) -> float:
    """Expected drafted tokens kept per block if step accuracies were independent (a rough guide)."""
    return float(np.sum(np.cumprod(top1)))
