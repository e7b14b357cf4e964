"""The decode step against the context length: blockdraft's forward vs llama.cpp's, side by side.

Why: short chats are won or lost on the single-token step, and every step slows as the cache
grows (attention reads all of it). This times our target's forward of 1, 8 and 16 tokens after
a prefill of each context length (blockdraft.sizing.measure_cost_curve: medians of interleaved
rounds), then, if a `llama-bench` binary is given, llama.cpp's on the default model's Q4_1 GGUF
at the same depths: `-n 1`-token generation (its decode step) and 8- and 16-token batches
(`-p 8` / `-p 16` at depth `-d N`, the size of a verification call).

    python benchmarks/step_by_context.py --out runs/step-by-context.json \\
        [--llama-bench BUILD/bin/llama-bench] [--dtype float32] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from blockdraft.bench.provenance import results_header

CONTEXTS = (128, 512, 2048, 6144)
SIZES = (1, 8, 16)


def ours(dtype: str, threads: int, contexts: tuple[int, ...]) -> dict[int, dict[int, float]]:
    """Milliseconds per forward of n tokens after a prefill of each context length."""
    import torch

    import blockdraft
    from blockdraft.sizing import measure_cost_curve

    torch.set_num_threads(threads)
    dec = blockdraft.load(dtype=dtype)
    out = {}
    for context in contexts:
        curve = measure_cost_curve(dec.target, sizes=SIZES, context=context, rounds=7)
        out[context] = {n: round(1000 * s, 2) for n, s in zip(curve.tokens, curve.seconds)}
        print(f"blockdraft {dtype} context {context}: {out[context]} ms", file=sys.stderr)
    return out


def llama_cpp(binary: Path, threads: int, contexts: tuple[int, ...]) -> dict[int, dict[int, float]]:
    """llama-bench's milliseconds per n-token forward at each depth (n = 1: token generation)."""
    from blockdraft.models import gguf_file

    out: dict[int, dict[int, float]] = {}
    for context in contexts:
        run = subprocess.run([str(binary), "-m", gguf_file(), "-t", str(threads), "-d", str(context), "-r", "5",
                              "-n", "16", "-p", ",".join(str(n) for n in SIZES[1:]), "-o", "json"],
                             capture_output=True, text=True, check=True)
        row = {}
        for test in json.loads(run.stdout):
            n_gen, n_prompt = test["n_gen"], test["n_prompt"]
            tokens_per_s = test["avg_ts"]
            if n_gen:  # generation: one token per forward
                row[1] = round(1000 / tokens_per_s, 2)
            else:
                row[n_prompt] = round(1000 * n_prompt / tokens_per_s, 2)
        out[context] = dict(sorted(row.items()))
        print(f"llama.cpp context {context}: {out[context]} ms", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--llama-bench", type=Path, help="llama.cpp's llama-bench binary (default: ours only)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    args = ap.parse_args()
    contexts = tuple(int(c) for c in args.contexts.split(","))
    results = {**results_header(args.threads),
               "ms_per_forward": {f"blockdraft {args.dtype}": ours(args.dtype, args.threads, contexts)}}
    if args.llama_bench:
        results["ms_per_forward"]["llama.cpp Q4_1"] = llama_cpp(args.llama_bench, args.threads, contexts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["ms_per_forward"], indent=1))


if __name__ == "__main__":
    main()
