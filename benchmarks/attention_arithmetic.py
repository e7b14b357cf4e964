"""Exact attention's products in bfloat16 and in float32: one layer's cost, and where float32
products keep each query row's result.

Why: the fast path keeps a bfloat16 model's KV cache in float32 where float32 products are
row-exact (exact_attention.cache_dtype probes that at load); this shows what that buys and for
which head shapes and thread counts the probe says yes.

    python benchmarks/attention_arithmetic.py --out runs/attention-arithmetic.json [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from blockdraft.bench.provenance import results_header

KEYS = (200, 1000, 4000)
TOKENS = (1, 4)
SHAPES = ((64, 1, 3), (64, 2, 3), (64, 3, 3), (128, 4, 8), (128, 8, 8))  # head width, query heads per key head, key heads


def layer_microseconds(threads: int) -> dict:
    """One layer's row_exact_attention (SmolLM2: 9 query heads, 3 key heads, 64 wide) for a
    token or four over a bfloat16 and a float32 cache."""
    import torch

    from blockdraft.exact_attention import padded_keys, row_exact_attention

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    cache = {dtype: [torch.randn(1, 3, 4096, 64, generator=g).bfloat16().to(dtype) for _ in range(2)]
             for dtype in (torch.bfloat16, torch.float32)}
    out = {}
    for keys in KEYS:
        span = padded_keys(keys)
        for tokens in TOKENS:
            q = torch.randn(1, 9, tokens, 64, generator=g).bfloat16()
            mask = None if tokens == 1 else torch.ones(tokens, keys, dtype=torch.bool).tril(keys - tokens)
            for dtype, (k, v) in cache.items():
                def call():
                    row_exact_attention(q, k[:, :, :span], v[:, :, :span], mask, 0.125, valid=keys)
                for _ in range(30):
                    call()
                began = time.perf_counter()
                for _ in range(500):
                    call()
                out[f"{keys} keys, {tokens} tokens, {str(dtype).removeprefix('torch.')} cache"] = \
                    round((time.perf_counter() - began) / 500 * 1e6, 1)
    return out


def probe(threads: int) -> dict:
    """exact_attention.cache_dtype per head shape, in a fresh process per thread count."""
    code = ("import json, sys, torch; torch.set_num_threads(int(sys.argv[1])); "
            "from blockdraft.exact_attention import cache_dtype; "
            f"print(json.dumps({{f'{{d}} wide, {{g}} per key head, {{kv}} key heads': str(cache_dtype(d, g, kv)).removeprefix('torch.') "
            f"for d, g, kv in {SHAPES!r}}}))")
    done = subprocess.run([sys.executable, "-c", code, str(threads)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()


    results = {
        **results_header(args.threads),
        "layer_us": layer_microseconds(args.threads),
        "cache_dtype": {str(t): probe(t) for t in sorted({1, args.threads, 2 * args.threads})},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
