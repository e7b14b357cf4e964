"""Training the context-reading feature head (model.py) on distillation data.

Same data and cached hidden states as the BPD heads (train/heads.py), but whole answers at a
time: the head attends over an answer's positions in order. Loss per position s: cross-entropy
of its token guess for x[s+2] (draft-vocabulary rows of the frozen projection) plus a
smooth-L1 pull of its feature guess towards h[s+1], the base model's real next hidden state.
A second pass feeds the head its own first-pass guesses in place of h (what drafting beyond
the first token does) and adds the same loss, so later draft tokens are trained for too.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from blockdraft.errors import BlockdraftError
from blockdraft.models import LoadedModel, model_fingerprint
from blockdraft.train.heads import (IGNORE, Projection, draft_vocabulary, heldout_sequences, hidden_states,
                                    load_sequences, vocab_coverage)
from blockdraft.train.schedule import StepPlan

from .model import FeatureHead, FeatureHeadConfig, load_feature_head


@dataclass(frozen=True)
class FeatureTrainConfig:
    num_heads: int = 6  # draft tokens per block when drafting
    epochs: int = 1
    lr: float = 1e-3
    batch_positions: int = 4096  # answer positions per optimiser step (whole answers, padded)
    warmup: float = 0.03
    clip: float = 1.0
    feature_weight: float = 1.0  # weight of the smooth-L1 feature loss next to the token loss
    unroll: bool = True  # second pass on the head's own feature guesses
    heldout: float = 0.05
    seed: int = 0
    max_seconds: float = 0
    draft_vocab: int = 4096
    prompt_context: bool = True  # the head also reads the prompt's tokens (copying from it)


@dataclass
class Answers:
    """Whole distilled sequences, as the head sees them: answer positions read the cached h; with
    `prompt_context` the prompt positions come first and read their own token's embedding."""

    hidden: torch.Tensor  # [N, H] float16: h at every answer position (from the last prompt token), concatenated
    ids: list[list[int]]  # prompt + answer ids of each sequence
    prompt_lengths: list[int]
    offsets: np.ndarray  # sequence a's answer positions are rows offsets[a]:offsets[a+1] of `hidden`
    prompt_context: bool

    def first(self, a: int) -> int:
        """Index of sequence a's first position the head reads (0, or the last prompt token)."""
        return 0 if self.prompt_context else self.prompt_lengths[a] - 1

    def length(self, a: int) -> int:
        return len(self.ids[a]) - 1 - self.first(a)

    def batch(self, which: list[int], proj: Projection, embed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Padded [B, T] tensors: inputs h, e(next token), token targets, feature targets, answer mask."""
        t = max(self.length(a) for a in which)
        b, h = len(which), self.hidden.shape[1]
        hid = torch.zeros(b, t + 1, h)
        nxt, tgt = torch.zeros(b, t, dtype=torch.long), torch.full((b, t), IGNORE, dtype=torch.long)
        answer = torch.zeros(b, t + 1, dtype=torch.bool)
        for r, a in enumerate(which):
            ids, skip, n = torch.tensor(self.ids[a][self.first(a):]), self.prompt_lengths[a] - 1 - self.first(a), self.length(a)
            hid[r, :skip] = embed[ids[:skip]]  # prompt positions: their own token
            hid[r, skip:n] = self.hidden[self.offsets[a]:self.offsets[a + 1]].float()
            answer[r, skip:n] = True
            nxt[r, :n] = ids[1:]
            tgt[r, skip: n - 1] = ids[skip + 2:]
        valid = answer[:, :t] & answer[:, 1:]  # a feature target h[s+1] exists
        return hid[:, :t], embed[nxt], proj.columns(tgt), hid[:, 1:], valid, answer[:, :t]


def batches(lengths: list[int], which: list[int], size: int, rng: random.Random) -> list[list[int]]:
    """Answers grouped by similar length into batches of about `size` padded positions, shuffled."""
    order = sorted(which, key=lambda a: lengths[a])
    out, cur = [], []
    for a in order:
        if cur and (len(cur) + 1) * lengths[a] > size:
            out.append(cur)
            cur = []
        cur.append(a)
    if cur:
        out.append(cur)
    rng.shuffle(out)
    return out


def losses(head: FeatureHead, proj: Projection, batch: tuple[torch.Tensor, ...], cfg: FeatureTrainConfig
           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Total loss and per-pass [hits, count] of the token guesses."""
    hid, emb, tgt, feat_tgt, valid, answer = batch
    scored = tgt != IGNORE
    total, stats, inputs = 0.0, [], hid
    for _ in range(2 if cfg.unroll else 1):
        feats, _ = head(inputs, emb)
        logits = feats[scored].float() @ proj.rows.T  # answer positions only: the projection is most of the cost
        ce = F.cross_entropy(logits, tgt[scored])
        reg = F.smooth_l1_loss(feats.float()[valid], feat_tgt[valid])
        total = total + ce + cfg.feature_weight * reg
        stats.append(torch.stack([(logits.argmax(-1) == tgt[scored]).sum(), scored.sum()]))
        # the next pass reads the guesses: answer position s+1 gets the guess of h[s+1] made at s
        guesses = torch.cat([hid[:, :1], feats.detach().float()[:, :-1]], 1)
        inputs = torch.where((answer & answer.roll(1, 1))[..., None], guesses, hid)
    return total, stats


def train_feature_head(loaded: LoadedModel, data_dir: str | Path, out: str | Path, cfg: FeatureTrainConfig,
                       init: str | None = None) -> tuple[FeatureHead, dict]:
    """Train a feature head on `blockdraft distill` data; returns it and the held-out report."""
    out, data_dir = Path(out), Path(data_dir)
    fingerprint = model_fingerprint(loaded.model)
    seqs, meta = load_sequences(data_dir)
    if meta.get("model_fingerprint") not in (None, fingerprint):
        raise BlockdraftError(f"{data_dir} was distilled from another model ({meta.get('model')}); distill again for this one")
    torch.manual_seed(cfg.seed)
    hidden = hidden_states(loaded, seqs, data_dir)
    spans = [len(ids) - plen for ids, plen, *_ in seqs]
    answers = Answers(hidden, [s.ids for s in seqs], [s.prompt_len for s in seqs],
                      np.concatenate([[0], np.cumsum(spans)]), cfg.prompt_context)
    full = loaded.model.get_output_embeddings().weight.detach().float()
    vocab = draft_vocabulary(seqs, cfg.draft_vocab)
    proj = Projection(full, vocab)
    held = heldout_sequences(len(seqs), cfg.heldout, cfg.seed)
    train = [a for a in range(len(seqs)) if a not in held]
    h = full.shape[1]  # head width 64 and a SwiGLU 8/3 as wide as the model, as in Llama-style blocks
    head = FeatureHead(FeatureHeadConfig(num_heads=cfg.num_heads, hidden_size=h, vocab_size=full.shape[0],
                                         attention_heads=max(1, h // 64), intermediate_size=8 * h // 3,
                                         draft_vocab_size=len(vocab), base_model=loaded.name, base_fingerprint=fingerprint,
                                         prompt_context=cfg.prompt_context))
    if init:  # the loader's one-line errors for a missing, corrupt or mismatched checkpoint
        start = load_feature_head(init)
        start.check_compatible(loaded.model, fingerprint)
        head.load_state_dict(start.state_dict())
    head.float().train()
    lengths = [answers.length(a) for a in range(len(seqs))]
    rng = random.Random(cfg.seed)
    per_epoch = len(batches(lengths, train, cfg.batch_positions, random.Random(0)))
    plan = StepPlan(per_epoch * cfg.epochs, cfg.max_seconds, cfg.warmup)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, plan.lr_factor)
    done, began = 0, time.time()
    for epoch in range(cfg.epochs):
        bar = tqdm(batches(lengths, train, cfg.batch_positions, rng), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step")
        for which in bar:
            if plan.finished(done):
                break
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, stats = losses(head, proj, answers.batch(which, proj, full), cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.clip)
            opt.step()
            sched.step()
            done += 1
            plan.tick(done)
            if done % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", top1="/".join(f"{int(h) / max(1, int(n)):.2f}" for h, n in stats))
        bar.close()
        if plan.finished(done):
            break
    report = evaluate(head, proj, answers, sorted(held), cfg)
    head.set_draft_vocab(vocab)
    head.config.training = {
        "data": str(data_dir), "sources": sorted({s.source for s in seqs if s.source}), "sequences": len(seqs),
        "train_positions": int(sum(spans[a] for a in train)), "epochs": round(done / per_epoch, 2), "steps": done,
        "seed": cfg.seed, "config": asdict(cfg), "train_seconds": round(time.time() - began, 1), "device": str(loaded.device),
        "heldout": report, "init": init, "distill": meta,
        "draft_vocab": {"size": len(vocab), "coverage": round(vocab_coverage(seqs, vocab), 4)},
    }
    head.save(out)
    return head, report


@torch.no_grad()
def evaluate(head: FeatureHead, proj: Projection, answers: Answers, which: list[int], cfg: FeatureTrainConfig) -> dict:
    """Held-out top-1 of the first draft token (true features) and of the second (own guesses)."""
    head.eval()
    hits = torch.zeros(2)
    count = torch.zeros(2)
    lengths = [answers.length(a) for a in range(len(answers.ids))]
    full = proj.full
    for which_b in batches(lengths, which, cfg.batch_positions, random.Random(0)):
        _, stats = losses(head, proj, answers.batch(which_b, proj, full), replace(cfg, unroll=True))
        for i, (h, n) in enumerate(stats):
            hits[i] += float(h)
            count[i] += float(n)
    acc = (hits / count.clamp(min=1)).tolist()
    return {"top1_first": round(acc[0], 4), "top1_second": round(acc[1], 4), "positions": int(count[0])}


def main(argv: list[str] | None = None) -> int:
    """`python -m feature_head.train` (from experiments/): train a feature head on `blockdraft distill` output."""
    import argparse

    from blockdraft.models import DEFAULT_MODEL, load_model

    p = argparse.ArgumentParser(description="train the context-reading feature head on distillation data")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--data", required=True, help="folder written by `blockdraft distill`")
    p.add_argument("--out", required=True, help="folder for the head (safetensors + config.json)")
    p.add_argument("--num-heads", type=int, default=6, help="draft tokens per block")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-positions", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=0, help="time budget; the LR schedule shrinks to fit")
    p.add_argument("--draft-vocab", type=int, default=4096, help="draft only the N most frequent answer tokens")
    p.add_argument("--init", help="start from this trained feature head")
    p.add_argument("--answer-only", action="store_true", help="read the answer positions only, not the prompt's tokens")
    args = p.parse_args(argv)
    cfg = FeatureTrainConfig(num_heads=args.num_heads, epochs=args.epochs, lr=args.lr, seed=args.seed,
                             batch_positions=args.batch_positions, max_seconds=args.max_seconds,
                             draft_vocab=args.draft_vocab, prompt_context=not args.answer_only)
    try:
        _, report = train_feature_head(load_model(args.model, args.dtype), args.data, args.out, cfg, init=args.init)
    except BlockdraftError as exc:
        print(f"error: {exc}")
        return 2
    print(f"held-out top-1: first draft token {report['top1_first']:.3f}, second (from the head's own features) "
          f"{report['top1_second']:.3f} over {report['positions']:,} positions; saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
