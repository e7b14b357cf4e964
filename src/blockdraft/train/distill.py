"""Self-distillation data: the base model's own greedy answers to training prompts.

Heads learn to predict what this model will actually say, which is exactly what greedy
verification accepts. Output: DIR/distill.jsonl, one record per prompt with the chat-formatted
prompt ids and the answer ids cut after the first end-of-turn token (padding after it would
teach heads to predict padding). Resumable: ids already in the file are skipped.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import BlockdraftError
from ..jsonl import read_jsonl
from ..models import LoadedModel, model_fingerprint
from ..prompting import encode_chat

META_FILE = "meta.json"
DATA_FILE = "distill.jsonl"


@dataclass(frozen=True)
class DistillConfig:
    max_new_tokens: int = 256  # answer length cap per prompt
    max_prompt_tokens: int = 1024  # longer prompts are skipped (they dominate padding cost)
    batch_size: int = 0  # 0: 16 on CPU, 384 on a GPU
    limit: int = 0  # at most this many new prompts this run (0: all)


def _validate_prompt(record: dict) -> str | None:
    turns = record.get("turns")
    if "id" not in record:
        return "missing field 'id'"
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        return "field 'turns' must be a non-empty list of non-empty strings"
    return None


def _check_meta(out: Path, meta: dict) -> None:
    path = out / META_FILE
    if path.exists():
        old = json.loads(path.read_text())
        keys = ("model_fingerprint", "max_new_tokens")
        if any(old.get(k) != meta[k] for k in keys):
            raise BlockdraftError(
                f"{out} already holds another distillation run ({', '.join(f'{k}={old.get(k)}' for k in keys)}); "
                "use a new --out folder"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(meta, indent=2) + "\n")


def distill(loaded: LoadedModel, prompts_file: str | Path, out: str | Path, cfg: DistillConfig) -> Path:
    """Generate greedy answers (first turn, chat template) for every prompt not yet in DIR."""
    out = Path(out)
    meta = {"model": loaded.name, "model_fingerprint": model_fingerprint(loaded.model),
            "max_new_tokens": cfg.max_new_tokens, "prompts": str(prompts_file),
            "vocab_size": loaded.model.get_output_embeddings().weight.shape[0]}
    _check_meta(out, meta)
    data = out / DATA_FILE
    done = {rec["id"] for _, rec in read_jsonl(data, on_error="skip")} if data.exists() else set()
    tok = loaded.tokenizer
    todo = []
    for _, rec in read_jsonl(prompts_file, _validate_prompt, on_error="skip"):
        if rec["id"] in done:
            continue
        ids = encode_chat(tok, [rec["turns"][0]])
        if len(ids) <= cfg.max_prompt_tokens:
            todo.append((rec, ids))
        if cfg.limit and len(todo) >= cfg.limit:
            break
    on_gpu = loaded.device.type == "cuda"
    batch = cfg.batch_size or (384 if on_gpu else 16)
    window = batch * 8  # sort by length inside windows: little padding, yet the file order (mix) is kept
    todo = [item for w in range(0, len(todo), window) for item in sorted(todo[w:w + window], key=lambda it: len(it[1]))]
    eos = _stop_ids(loaded)
    new_tokens, start = 0, time.time()
    with data.open("a", encoding="utf-8") as sink, tqdm(total=len(todo), desc="distill", unit="prompt") as bar:
        for first in range(0, len(todo), batch):
            chunk = todo[first:first + batch]
            answers = _generate_batch(loaded, [ids for _, ids in chunk], cfg.max_new_tokens, eos)
            for (rec, ids), answer in zip(chunk, answers):
                row = {"id": rec["id"], "source": rec.get("source", ""), "domain": rec.get("domain", ""),
                       "prompt_ids": ids, "answer_ids": answer, "text": tok.decode(answer, skip_special_tokens=True)}
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                new_tokens += len(answer)
            sink.flush()
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{new_tokens / (time.time() - start):.0f}", tokens=new_tokens)
    return data


def _stop_ids(loaded: LoadedModel) -> set[int]:
    eos = loaded.model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(loaded.tokenizer.eos_token_id)
    return ids


@torch.inference_mode()
def _generate_batch(loaded: LoadedModel, prompts: list[list[int]], max_new: int, eos: set[int]) -> list[list[int]]:
    """Left-padded batched greedy generation; each answer is cut after its first stop token."""
    pad = loaded.tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    dev = loaded.device
    out = loaded.model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                                max_new_tokens=max_new, pad_token_id=pad, eos_token_id=sorted(eos))
    answers = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        answers.append(row[:cut])
    return answers
