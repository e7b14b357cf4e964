"""Training the local neural rescorer: a tiny causal LM over the base model's tokenizer.

Kim et al. rescore each head's top-k with a small LM ("local neural rescoring"). Ours is a
few-million-parameter Llama-architecture model trained as a plain next-token LM on the
self-distillation corpus (prompts and the base model's answers), so it knows what the base
model tends to say next at a fraction of its cost.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import BlockdraftError
from .heads import load_sequences
from .schedule import StepPlan

RESCORER_META = "rescorer.json"


@dataclass(frozen=True)
class RescorerTrainConfig:
    hidden_size: int = 96
    layers: int = 2
    attention_heads: int = 3
    intermediate_size: int = 256
    context: int = 512  # training chunk length
    epochs: int = 1
    lr: float = 3e-3
    batch_chunks: int = 32
    seed: int = 0
    max_seconds: float = 0  # time budget: the schedule shrinks to fit it (0: none)


def build_rescorer(vocab_size: int, cfg: RescorerTrainConfig, bos: int | None, eos: int | None):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
                         num_attention_heads=cfg.attention_heads, num_key_value_heads=cfg.attention_heads,
                         intermediate_size=cfg.intermediate_size, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    return LlamaForCausalLM(config)


def _chunks(seqs: list, context: int, eos: int) -> torch.Tensor:
    """Concatenate every sequence (prompt + answer), then cut into [N, context] rows."""
    stream = np.concatenate([np.asarray(ids + [eos], dtype=np.int64) for ids, *_ in seqs])
    n = len(stream) // context
    return torch.from_numpy(stream[: n * context].reshape(n, context))


def train_rescorer(loaded, data_dir: str | Path, out: str | Path, cfg: RescorerTrainConfig) -> dict:
    """Train the rescorer on distillation data and save it as a HF model folder plus rescorer.json."""
    from ..models import model_fingerprint

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise BlockdraftError(f"{out} already holds another run; use a new --out folder")
    seqs, meta = load_sequences(Path(data_dir))
    tok = loaded.tokenizer
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    torch.manual_seed(cfg.seed)
    dev = loaded.device
    model = build_rescorer(vocab, cfg, tok.bos_token_id, tok.eos_token_id).to(dev)
    rows = _chunks(seqs, cfg.context, tok.eos_token_id)
    if len(rows) < 2:
        raise BlockdraftError(f"{data_dir} holds too little text for {cfg.context}-token training chunks")
    held = max(1, len(rows) // 50)
    train_rows, held_rows = rows[held:], rows[:held]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    plan = StepPlan(math.ceil(len(train_rows) / cfg.batch_chunks) * cfg.epochs, cfg.max_seconds)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, plan.lr_factor)
    gen = torch.Generator().manual_seed(cfg.seed)
    began = time.time()
    model.train()
    bar = tqdm(total=plan.total, desc="rescorer", unit="step")
    done = 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(train_rows), generator=gen)
        for first in range(0, len(perm), cfg.batch_chunks):
            if plan.finished(done):
                break
            batch = train_rows[perm[first:first + cfg.batch_chunks]].to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                logits = model(input_ids=batch).logits
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), batch[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(); sched.step()
            done += 1
            plan.tick(done)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    with torch.no_grad():
        held_loss = sum(F.cross_entropy(model(input_ids=r[None].to(dev)).logits[0, :-1].float(), r[1:].to(dev)).item()
                        for r in held_rows[:64]) / min(64, len(held_rows))
    model.to(torch.float16).save_pretrained(out)
    info = {"format": "blockdraft-rescorer/1", "base_model": loaded.name,
            "base_fingerprint": model_fingerprint(loaded.model), "vocab_size": vocab, "alpha": {"default": 1.0},
            "training": {"data": str(data_dir), "tokens": int(rows.numel()), "steps": done, "config": asdict(cfg),
                         "train_seconds": round(time.time() - began, 1), "heldout_loss": round(held_loss, 4),
                         "device": str(dev), "distill": meta}}
    (out / RESCORER_META).write_text(json.dumps(info, indent=2) + "\n")
    return info
