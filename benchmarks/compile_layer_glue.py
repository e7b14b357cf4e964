"""One decoder layer's work outside attention, eager against torch.compile, at the default dtype.

Why: a single-token step at the default dtype (4-bit products) spends about a third of its time
in small element-wise operations (norms, rotary, casts, views) between the products. A compiled
layer body could fuse them, provided each row's result stays what the row gets alone (a token's
logits must not depend on the tree it is verified in). This compiles the two pieces around
attention as the fast path runs them (norm, q|k|v product, rotary; then output product,
residual, norm, gate|up product, SiLU, down product, residual) with inductor, and reports:

- milliseconds per layer for 1, 4 and 16 rows, eager and compiled (medians of interleaved rounds);
- whether every row of a compiled call equals the same row's compiled 1-row call, and whether
  the compiled results equal eager's bit for bit.

    python benchmarks/compile_layer_glue.py --out runs/glue.json [--dynamic] [--cpp-wrapper] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import rotate_half

from blockdraft.bench.provenance import results_header
from blockdraft.cpu import EXACT_ROWS

ROWS = (1, 4, 16)


def four_bit(linear, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T as the fast path calls its projections in a drafted call (each row exact)."""
    return linear(x, EXACT_ROWS)


def before_attention(x, norm, qkv, cos, sin, heads: int, kv_heads: int, head_dim: int):
    n = x.shape[1]
    q_k_v = four_bit(qkv, norm(x))
    width = (heads + kv_heads) * head_dim
    qk = q_k_v[..., :width].view(1, n, -1, head_dim).transpose(1, 2)
    qk = qk * cos + rotate_half(qk) * sin
    return qk, q_k_v[..., width:].view(1, n, -1, head_dim).transpose(1, 2)


def after_attention(x, att, out, norm, gate_up, down):
    n = x.shape[1]
    x = x + four_bit(out, att.transpose(1, 2).reshape(1, n, -1))
    gate, up = four_bit(gate_up, norm(x)).chunk(2, -1)
    return x + four_bit(down, F.silu(gate) * up)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dynamic", action="store_true", help="one graph for every row count (default: one per count)")
    ap.add_argument("--cpp-wrapper", action="store_true", help="inductor's C++ wrapper instead of its Python one")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor

    import blockdraft

    inductor.cpp_wrapper = args.cpp_wrapper
    dec = blockdraft.load()
    runner = dec.target.runner
    if dec.loaded.dtype_name != "int4":
        sys.exit(f"this compares the 4-bit layer body; the default dtype here is {dec.loaded.dtype_name}")
    runner.reset()  # builds the fused layers
    heads, kv_heads, head_dim = runner.heads, runner.kv_heads, runner.head_dim
    hidden = heads * head_dim
    compiled = {f: torch.compile(f, dynamic=args.dynamic) for f in (before_attention, after_attention)}
    g = torch.Generator().manual_seed(0)

    def inputs(n: int):
        return (torch.randn(1, n, hidden, generator=g).bfloat16() * 3, torch.randn(1, 1, n, head_dim, generator=g).bfloat16(),
                torch.randn(1, 1, n, head_dim, generator=g).bfloat16(), torch.randn(1, heads, n, head_dim, generator=g).bfloat16())

    def layer(fns, norm1, qkv, out, norm2, gate_up, down, x, cos, sin, att):
        qk, v = fns[0](x, norm1, qkv, cos, sin, heads, kv_heads, head_dim)
        return qk, v, fns[1](x, att, out, norm2, gate_up, down)

    eager_fns, compiled_fns = (before_attention, after_attention), tuple(compiled.values())
    results = {**results_header(args.threads), "dynamic": args.dynamic, "cpp_wrapper": args.cpp_wrapper}
    began = time.perf_counter()
    with torch.inference_mode():
        for n in ROWS:
            layer(compiled_fns, *runner.layers[0], *inputs(n))
        results["compile_seconds"] = round(time.perf_counter() - began, 1)
        rows_differing = calls_differing = 0
        for n in (1, 2, 3, 5, 8, 13, 16):
            x, cos, sin, att = inputs(n)
            for parts in runner.layers[:4]:
                mine = layer(compiled_fns, *parts, x, cos, sin, att)
                eager = layer(eager_fns, *parts, x, cos, sin, att)
                calls_differing += not all(torch.equal(a, b) for a, b in zip(mine, eager))
                for r in range(n):
                    alone = layer(compiled_fns, *parts, x[:, r:r + 1], cos[:, :, r:r + 1], sin[:, :, r:r + 1], att[:, :, r:r + 1])
                    rows_differing += not (torch.equal(alone[0], mine[0][:, :, r:r + 1])
                                           and torch.equal(alone[1], mine[1][:, :, r:r + 1])
                                           and torch.equal(alone[2], mine[2][:, r:r + 1]))
        results["rows_differing_from_their_1_row_call"] = rows_differing
        results["calls_differing_from_eager"] = calls_differing
        results["ms_per_layer"] = {}
        for n in ROWS:
            args_n = (*runner.layers[3], *inputs(n))
            times = {"eager": [], "compiled": []}
            for _ in range(args.rounds):
                for name, fns in (("eager", eager_fns), ("compiled", compiled_fns)):
                    for _ in range(50):
                        layer(fns, *args_n)
                    start = time.perf_counter()
                    for _ in range(500):
                        layer(fns, *args_n)
                    times[name].append((time.perf_counter() - start) / 500 * 1000)
            results["ms_per_layer"][n] = {k: round(statistics.median(v), 4) for k, v in times.items()}
            print(n, results["ms_per_layer"][n], file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("compile_seconds", "rows_differing_from_their_1_row_call",
                                              "calls_differing_from_eager", "ms_per_layer")}, indent=1))


if __name__ == "__main__":
    main()
