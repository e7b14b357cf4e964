"""Self-distillation data: the base model's own greedy answers to training prompts.

Heads learn to predict what this model will actually say, which is exactly what greedy
verification accepts. Output: DIR/distill.jsonl, one record per prompt with the chat-formatted
prompt ids and the answer ids cut after the first end-of-turn token (padding after it would
teach heads to predict padding). Resumable: ids already in the file are skipped.

The base model's final hidden state at every answer-predicting position (the last prompt token
and each answer token but the last) is kept while generating, in DIR/hidden.f16 (float16 rows;
each record names its first row), so training needs no second pass over the data: that pass
took 49 minutes for 1.63 M positions on the 2-core CPU. These are the float32 features the
engine drafts from, computed as it computes them (one token at a time after the prompt).
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers.cache_utils import Cache

from ..corpus import Corpus, CorpusRecord
from ..errors import BlockdraftError
from ..jsonl import read_jsonl
from ..models import LoadedModel, model_fingerprint
from ..prompting import encode_chat
from . import batch_cache

META_FILE = "meta.json"
DATA_FILE = "distill.jsonl"
HIDDEN_FILE = "hidden.f16"


@dataclass(frozen=True)
class DistillConfig:
    max_new_tokens: int = 256  # answer length cap per prompt
    max_prompt_tokens: int = 1024  # longer prompts are skipped (they dominate padding cost)
    batch_size: int = 0  # rows generating at once; 0: 96 on CPU (bfloat16 here: 396 answer tokens/s, 377 with 64), 384 on a GPU
    limit: int = 0  # at most this many new prompts this run (0: all)
    corpus: str = ""  # also pack finished answers into this corpus folder (see corpus.py)
    shard_records: int = 2000  # records per corpus shard


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
        keys = ("model_fingerprint", "max_new_tokens") + (("dtype",) if "dtype" in old else ())
        if any(old.get(k) != meta[k] for k in keys):
            raise BlockdraftError(
                f"{out} already holds another distillation run ({', '.join(f'{k}={old.get(k)}' for k in keys)}); "
                "use a new --out folder"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(meta, indent=2) + "\n")


def check_prompts(prompts_file: str | Path) -> int:
    """How many usable prompts the file holds; none at all is one line (checked before the model loads)."""
    count = sum(1 for _ in read_jsonl(prompts_file, _validate_prompt, on_error="quiet"))
    if not count:
        raise BlockdraftError(f"{prompts_file}: no usable prompt (each line: a JSON object with 'id' and 'turns')")
    return count


def distill(loaded: LoadedModel, prompts_file: str | Path, out: str | Path, cfg: DistillConfig) -> Path:
    """Generate greedy answers (first turn, chat template) for every prompt not yet in DIR."""
    if cfg.max_new_tokens < 1:
        raise BlockdraftError(f"--max-new-tokens must be at least 1, not {cfg.max_new_tokens}")
    if cfg.batch_size < 0:
        raise BlockdraftError(f"--batch-size must be 0 (the default) or more, not {cfg.batch_size}")
    reason = batch_cache.unsupported(loaded.model.config)
    if reason is not None:
        raise BlockdraftError(f"distill cannot batch {loaded.name}: {reason}")
    out = Path(out)
    meta = {"model": loaded.name, "model_fingerprint": model_fingerprint(loaded.model),
            "max_new_tokens": cfg.max_new_tokens, "prompts": str(prompts_file),
            "vocab_size": loaded.model.get_output_embeddings().weight.shape[0],
            "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
            "max_prompt_tokens": cfg.max_prompt_tokens}
    corpus = Corpus.create_or_open(cfg.corpus, corpus_identity(meta)) if cfg.corpus else None
    _check_meta(out, meta)
    data = out / DATA_FILE
    done = {rec["id"] for _, rec in read_jsonl(data, on_error="skip")} if data.exists() else set()
    if corpus is not None:
        done |= corpus.record_ids()
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
    batch = cfg.batch_size or (384 if on_gpu else 96)
    window = batch * 8  # sort by length inside windows: little padding, yet the file order (mix) is kept
    todo = [item for w in range(0, len(todo), window) for item in sorted(todo[w:w + window], key=lambda it: len(it[1]))]
    eos = _stop_ids(loaded)
    new_tokens, pending, start = 0, 0, time.time()
    row_bytes = 2 * loaded.model.config.hidden_size
    _drop_partial_row(out / HIDDEN_FILE, row_bytes)
    with data.open("a", encoding="utf-8") as sink, (out / HIDDEN_FILE).open("ab") as states, \
            tqdm(total=len(todo), desc="distill", unit="prompt") as bar:
        for index, answer, hidden in _answer_stream(loaded, [ids for _, ids in todo], cfg.max_new_tokens, eos, batch):
            rec, ids = todo[index]
            hidden_row = states.tell() // row_bytes
            states.write(hidden.numpy().tobytes())
            states.flush()  # rows before records: a record never names rows that are not on disk
            row = {"id": rec["id"], "source": rec.get("source", ""), "domain": rec.get("domain", ""),
                   "license": rec.get("license", ""), "prompt_ids": ids, "answer_ids": answer, "hidden_row": hidden_row,
                   "text": tok.decode(answer, skip_special_tokens=True)}
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            sink.flush()
            new_tokens += len(answer)
            pending += 1
            if corpus is not None and pending >= cfg.shard_records:
                pack_distilled(out, corpus)
                pending = 0
            bar.update(1)
            bar.set_postfix(tok_s=f"{new_tokens / (time.time() - start):.0f}", tokens=new_tokens)
    if corpus is not None:
        pack_distilled(out, corpus)
    return data


def corpus_identity(meta: dict) -> dict:
    """What a corpus records about a run that extends it (corpus.IDENTITY_KEYS must agree; the dtype goes with each shard)."""
    return {"model": meta["model"], "model_fingerprint": meta["model_fingerprint"],
            "dtype": meta.get("dtype", "float32"), "vocab_size": meta["vocab_size"],
            "generation": {"decoding": "greedy", "turn": "first user turn, chat template",
                           "stop": "first end-of-turn token", "max_new_tokens": meta["max_new_tokens"],
                           "max_prompt_tokens": meta.get("max_prompt_tokens", DistillConfig.max_prompt_tokens)}}


def pack_distilled(data_dir: str | Path, corpus: Corpus | str | Path,
                   licences: dict[str, str] | None = None) -> dict | None:
    """Append a distillation folder's records that the corpus lacks as one new shard.

    `corpus` is an open Corpus or a folder (created with this run's identity when new).
    """
    data_dir = Path(data_dir)
    meta_path = data_dir / META_FILE
    if not meta_path.is_file():
        raise BlockdraftError(f"{data_dir} is not a distillation folder (no {META_FILE})")
    identity = corpus_identity(json.loads(meta_path.read_text()))
    if isinstance(corpus, Corpus):
        corpus.check_identity(identity)
    else:
        corpus = Corpus.create_or_open(corpus, identity)
    licences = dict(licences or {})
    records = []
    for _, rec in read_jsonl(data_dir / DATA_FILE, _validate_record, on_error="skip"):
        if rec.get("license"):
            licences.setdefault(rec.get("source", ""), rec["license"])
        records.append(CorpusRecord(rec["id"], rec.get("domain", ""), rec.get("source", ""),
                                    np.asarray(rec["prompt_ids"]), np.asarray(rec["answer_ids"])))
    return corpus.append(records, licences, dtype=identity["dtype"])


def _validate_record(rec: dict) -> str | None:
    ok = isinstance(rec.get("id"), str) and isinstance(rec.get("prompt_ids"), list) and isinstance(rec.get("answer_ids"), list)
    return None if ok else "missing 'id', 'prompt_ids' or 'answer_ids'"


def _stop_ids(loaded: LoadedModel) -> set[int]:
    eos = loaded.model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(loaded.tokenizer.eos_token_id)
    return ids


def _drop_partial_row(path: Path, row_bytes: int) -> None:
    """Cut a row a crash left half-written, so the rows appended next start on a row boundary."""
    size = path.stat().st_size if path.exists() else 0
    if size % row_bytes:
        os.truncate(path, size - size % row_bytes)


def kept_hidden(data_dir: str | Path, hidden_size: int) -> np.ndarray | None:
    """The hidden states `distill` kept, [rows, H] float16 (memory-mapped), or None if there are none."""
    path = Path(data_dir) / HIDDEN_FILE
    rows = path.stat().st_size // (2 * hidden_size) if path.exists() else 0
    return np.memmap(path, dtype=np.float16, mode="r", shape=(rows, hidden_size)) if rows else None


class _Rows(NamedTuple):
    """A batch being decoded: its KV cache, attention mask [rows, cached positions], each row's
    last position [rows] and last final hidden state [rows, H]."""

    cache: Cache
    mask: torch.Tensor
    position: torch.Tensor
    hidden: torch.Tensor

    def place(self, slots: list[int], new: _Rows) -> _Rows:
        """These rows with `new`'s in rows `slots` (finished answers' rows)."""
        index = torch.tensor(slots, device=self.mask.device)
        batch_cache.place_rows(self.cache, index, new.cache)
        width = max(self.mask.shape[1], new.mask.shape[1])
        mask = F.pad(self.mask, (width - self.mask.shape[1], 0)).index_put((index,), F.pad(new.mask, (width - new.mask.shape[1], 0)))
        return _Rows(self.cache, mask, self.position.index_put((index,), new.position),
                     self.hidden.index_put((index,), new.hidden))

    def select(self, keep: list[int]) -> _Rows:
        """Only the rows `keep`."""
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        return _Rows(self.cache, self.mask[index], self.position[index], self.hidden[index])


@torch.inference_mode()
def _answer_stream(loaded: LoadedModel, prompts: list[list[int]], max_new: int, eos: set[int], batch: int
                   ) -> Iterator[tuple[int, list[int], torch.Tensor]]:
    """Greedy answers with continuous batching: yields (prompt index, answer, hidden states) as each ends.

    Waiting prompts take the rows of finished answers: prefilled together once an eighth of the
    rows are free, left-padded, their KV cache written into those rows. A batch that only
    shrinks spends its last steps on a few long answers, while a step costs nearly as much at 8
    rows as at 32 (65 against 110 ms in bfloat16 on the 2-core CPU); and a finished row stays (its
    outputs unused) until a prompt takes it, because dropping it copies the whole cache. Each
    answer ends with its first stop token or at `max_new` tokens; its hidden states [len(answer),
    H] (float16) are those of the positions that predicted its tokens: the last prompt token,
    then each fed-back token.
    """
    from ..target import cache_argument

    model, dev = loaded.model, loaded.device
    body, head = model.get_decoder(), model.get_output_embeddings()
    layers, pad = model.config.num_hidden_layers, loaded.tokenizer.pad_token_id or 0
    cache_kwarg = cache_argument(body)  # looked up once: it inspects the forward's signature

    def forward(tokens: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, cache: Cache) -> torch.Tensor:
        return body(input_ids=tokens, attention_mask=mask, position_ids=position, use_cache=True,
                    **{cache_kwarg: cache}).last_hidden_state[:, -1]

    def prefill(group: list[int]) -> _Rows:
        """The prompts `group`, left-padded, through the model into a new cache."""
        width = max(len(prompts[i]) for i in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = batch_cache.growing_cache(layers)
        return _Rows(cache, mask, positions[:, -1], forward(ids, mask, positions, cache))

    refill = max(1, batch // 8)  # admit waiting prompts once this many rows are free: prefill in groups
    live: list[int | None] = []  # prompt index of each row; None: a finished row no prompt has taken yet
    rows: _Rows | None = None
    answers: dict[int, list[int]] = {}
    states: dict[int, list[torch.Tensor]] = {}
    admitted = 0  # prompts[:admitted] have had a row
    while admitted < len(prompts) or any(i is not None for i in live):
        free = [r for r, i in enumerate(live) if i is None] if live else list(range(batch))
        if admitted < len(prompts) and len(free) >= min(refill, len(prompts) - admitted):
            group = list(range(admitted, min(len(prompts), admitted + len(free))))
            admitted += len(group)
            slots = free[: len(group)]
            rows = prefill(group) if rows is None else rows.place(slots, prefill(group))
            live = live or [None] * len(group)
            for r, i in zip(slots, group):
                live[r], answers[i], states[i] = i, [], []
        elif admitted == len(prompts) and 2 * live.count(None) >= len(live):  # the last answers: drop finished rows
            keep = [r for r, i in enumerate(live) if i is not None]
            rows, live = rows.select(keep), [live[r] for r in keep]
        tokens = head(rows.hidden).argmax(-1)
        kept = rows.hidden.to("cpu", torch.float16)
        for r, (i, token) in enumerate(zip(live, tokens.tolist())):
            if i is None:
                continue
            answers[i].append(token)
            states[i].append(kept[r])
            if token in eos or len(answers[i]) == max_new:
                yield i, answers.pop(i), torch.stack(states.pop(i))
                live[r] = None
        going = [r for r, i in enumerate(live) if i is not None]
        if not going:  # every answer ended: the next prompts start a new batch
            live, rows = [], None
            continue
        mask = rows.mask
        unused = int(mask[going].any(0).int().argmax())  # leading positions no unfinished row reads
        if unused:
            batch_cache.drop_left(rows.cache, unused)
            mask = mask[:, unused:]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], 1)  # a finished row still reads its own position
        position = rows.position + 1
        rows = _Rows(rows.cache, mask, position, forward(tokens[:, None], mask, position[:, None], rows.cache))
