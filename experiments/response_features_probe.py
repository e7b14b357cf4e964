"""Do heads trained on existing assistant responses (teacher-forced, forward only) predict the
model's own greedy answers as well as heads trained on those answers (generated, ~10x dearer)?

Both sets get the same number of answer positions; both sets of chained heads train with the
same configuration; both are scored on the same held-out self-distilled answers (what greedy
verification accepts). The cost side: generation tokens/s from the distillation log, forward
tokens/s measured here. Writes a JSON report.

    python experiments/response_features_probe.py --distill runs/distill --tokens 60000 --out runs/probe-resp
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from blockdraft.heads import load_heads
from blockdraft.models import load_model, model_fingerprint
from blockdraft.prompting import encode_chat
from blockdraft.train.distill import DATA_FILE, HIDDEN_FILE, META_FILE
from blockdraft.train.heads import (HeadsTrainConfig, PositionData, Projection, evaluate, following_tokens,
                                    hidden_states, load_sequences, train_heads)

SHARED = Path("../shared/data/train_prompts")


def response_pairs(source: Path) -> list[tuple[str, str, str, str]]:
    """(id, domain, prompt, response) from the prompt corpora that carry reference answers."""
    pairs = []
    for i, line in enumerate((source / "gsm8k/train.jsonl").open()):
        rec = json.loads(line)
        pairs.append((f"gsm8k/train.jsonl:{i}", "math", rec["question"], rec["answer"].split("####")[0].strip()))
    for name, domain, answer in (("code_alpaca/code_alpaca_2k.json", "coding", "output"),
                                 ("llama_factory/alpaca_en_demo.json", "chat", "output"),
                                 ("gpteacher/codegen-instruct.json", "coding", "response"),
                                 ("gpteacher/roleplay-simple-deduped-roleplay-instruct.json", "roleplay", "response")):
        for i, rec in enumerate(json.loads((source / name).read_text())):
            prompt = "\n\n".join(p.strip() for p in (rec.get("instruction", ""), rec.get("input", "")) if p and p.strip())
            if prompt and rec.get(answer, "").strip():
                pairs.append((f"{name}:{i}", domain, prompt, rec[answer].strip()))
    return pairs


def write_folder(folder: Path, meta: dict, rows: list[dict], hidden_from: Path | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META_FILE).write_text(json.dumps(meta))
    with (folder / DATA_FILE).open("w") as sink:
        for row in rows:
            sink.write(json.dumps(row) + "\n")
    if hidden_from is not None and not (folder / HIDDEN_FILE).exists():
        os.symlink(hidden_from.resolve(), folder / HIDDEN_FILE)


def take_tokens(rows: list[dict], tokens: int) -> list[dict]:
    out, total = [], 0
    for row in rows:
        if total >= tokens:
            break
        out.append(row)
        total += len(row["answer_ids"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--distill", type=Path, required=True, help="a `blockdraft distill` folder (with kept hidden states)")
    ap.add_argument("--source", type=Path, default=SHARED)
    ap.add_argument("--tokens", type=int, default=60000, help="answer positions per training set")
    ap.add_argument("--heldout", type=float, default=0.15)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--num-heads", type=int, default=4)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    loaded = load_model("smollm2-135m")
    tok = loaded.tokenizer
    meta = json.loads((args.distill / META_FILE).read_text())
    records = [json.loads(line) for line in (args.distill / DATA_FILE).open()]
    records = [r for r in records if r.get("hidden_row", -1) >= 0 and r["answer_ids"]]
    random.Random(0).shuffle(records)
    n_held = max(20, int(len(records) * args.heldout))
    held, train = records[:n_held], records[n_held:]
    held_ids = {r["id"] for r in held}
    end = tok.convert_tokens_to_ids("<|im_end|>")
    pairs = [p for p in response_pairs(args.source) if p[0] not in held_ids]
    random.Random(1).shuffle(pairs)
    responses = []
    for rid, domain, prompt, answer in pairs:
        prompt_ids = encode_chat(tok, [prompt])
        answer_ids = tok(answer, add_special_tokens=False)["input_ids"][:255] + [end]
        if len(prompt_ids) <= 1024:
            responses.append({"id": rid, "domain": domain, "source": rid.split("/")[0], "prompt_ids": prompt_ids, "answer_ids": answer_ids})
        if sum(len(r["answer_ids"]) for r in responses) >= args.tokens:
            break
    own = take_tokens(train, args.tokens)
    a, b, c = args.out / "own", args.out / "responses", args.out / "heldout"
    write_folder(a, meta, own, args.distill / HIDDEN_FILE)
    write_folder(b, meta, responses)
    write_folder(c, meta, held, args.distill / HIDDEN_FILE)
    began = time.time()
    seqs_b, _ = load_sequences(b)
    hidden_states(loaded, seqs_b, b)  # the forward-only cost of the responses' features
    forward_s = time.time() - began
    report = {"own_positions": sum(len(r["answer_ids"]) for r in own),
              "response_positions": sum(len(r["answer_ids"]) for r in responses),
              "heldout_records": len(held), "response_feature_seconds": round(forward_s, 1),
              "response_forward_tokens_per_s": round(sum(len(s.ids) for s in seqs_b) / forward_s, 1)}
    cfg = HeadsTrainConfig(num_heads=args.num_heads, epochs=args.epochs, chain=True, heldout=0.02, lr=2e-3)
    seqs_c, _ = load_sequences(c)
    data_c = PositionData(hidden_states(loaded, seqs_c, c), following_tokens(seqs_c, args.num_heads), len(seqs_c))
    full = loaded.model.get_output_embeddings().weight.detach().float()
    for name, folder in (("own", a), ("responses", b)):
        began = time.time()
        train_heads(loaded, folder, args.out / f"heads-{name}", cfg)
        heads = load_heads(args.out / f"heads-{name}")
        result = evaluate(heads, Projection(full, heads.draft_vocab), data_c, np.arange(len(data_c.hidden)), 512)
        report[name] = {"train_seconds": round(time.time() - began, 1), "heldout_top1": [round(x, 4) for x in result["top1"]],
                        "heldout_chain_accept": round(result["chain_accept"], 4)}
        print(json.dumps(report), flush=True)
    report["fingerprint"] = model_fingerprint(loaded.model)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
