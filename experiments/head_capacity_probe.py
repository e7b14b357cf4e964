"""Probe: would the chained heads gain from more capacity? (a measurement, not a product path)

Wraps trained heads with one zero-initialised residual MLP per head (H -> WIDTH -> H after each
head's state, so training starts exactly at the heads' accuracy), trains everything on a
distillation folder's training split and prints the held-out greedy-chain acceptance after
every epoch, next to the unchanged heads'. Compare with `blockdraft train-heads --init HEADS` on
the same folder (same split: 5% of sequences, seed 0) to separate new capacity from new data.

    python experiments/head_capacity_probe.py --data runs/distill-t --width 1152 --epochs 2
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn


class WiderHeads(nn.Module):
    """Trained chained/plain heads + a residual SiLU MLP on each head's state (zero-initialised output)."""

    def __init__(self, heads: nn.Module, width: int):
        super().__init__()
        self.heads, self.config, self.num_heads = heads, heads.config, heads.num_heads
        size = heads.config.hidden_size
        self.up = nn.ModuleList(nn.Linear(size, width) for _ in range(self.num_heads))
        self.down = nn.ModuleList(nn.Linear(width, size) for _ in range(self.num_heads))
        for layer in self.down:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, hidden: torch.Tensor, before: torch.Tensor | None = None) -> torch.Tensor:
        states = self.heads(hidden, before)
        extra = [down(nn.functional.silu(up(states[..., j, :]))) for j, (up, down) in enumerate(zip(self.up, self.down))]
        return states + torch.stack(extra, -2)


def main() -> None:
    from blockdraft.heads import load_heads
    from blockdraft.models import load_model
    from blockdraft.train.heads import (PositionData, Projection, draft_vocabulary, evaluate, following_tokens,
                                        head_losses, hidden_states, load_sequences, split_positions)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="a `blockdraft distill` folder")
    ap.add_argument("--heads", default="src/blockdraft/assets/heads/smollm2-135m")
    ap.add_argument("--width", type=int, default=1152)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-positions", type=int, default=1024)
    args = ap.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(0)
    loaded = load_model()
    seqs, _ = load_sequences(args.data)
    heads = load_heads(args.heads).float()
    data = PositionData(hidden_states(loaded, seqs, args.data), following_tokens(seqs, heads.num_heads), len(seqs))
    train, held = split_positions(seqs, 0.05, 0)
    proj = Projection(loaded.model.get_output_embeddings().weight.detach().float(), draft_vocabulary(seqs, 16384))
    model = WiderHeads(heads, args.width).requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    steps = args.epochs * math.ceil(len(train) / args.batch_positions)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    print(f"heads as trained: chain {evaluate(model, proj, data, held, 1024)['chain_accept']:.3f}", flush=True)
    order, began = torch.Generator().manual_seed(0), time.time()
    for epoch in range(args.epochs):
        perm = train[torch.randperm(len(train), generator=order).numpy()]
        for first in range(0, len(perm), args.batch_positions):
            sel = torch.from_numpy(perm[first:first + args.batch_positions])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses, _ = head_losses(model, proj, data.hidden[sel].float(), data.following[sel])
            opt.zero_grad(set_to_none=True)
            losses.mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        report = evaluate(model, proj, data, held, 1024)
        top1 = " ".join(f"{a:.3f}" for a in report["top1"])
        print(f"epoch {epoch + 1}: chain {report['chain_accept']:.3f}, top-1 {top1} ({time.time() - began:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
