"""blockdraft's hand-written CPU forward against torch.compile (inductor, frozen weights, static cache).

Why: the lean Llama path and the oneDNN packing use private torch ops and an exact-type check;
they earn their place only if they beat what torch offers. This times, after a prefill of
`--context` tokens, a forward of 1, 8 and 16 tokens for:

- `blockdraft`: the decoder `blockdraft.load()` builds (blockdraft.sizing.measure_cost_curve);
- `eager`: transformers' own forward over a StaticCache, no compilation, over the model as
  `blockdraft.load` leaves it (at the default dtype its projections are the same 4-bit modules,
  and its attention runs on the grouped key/value heads, blockdraft.cpu.grouped_kv_sdpa);
- `compiled`: the same forward under `torch.compile` (inductor with `freezing`, which folds the
  weights into constants and prepacks oneDNN linears; one graph per input size, `dynamic=False`).

and checks exactness: the greedy token of every position, compiled vs eager, and compiled
logits of a token alone vs the same token among 15 others (a tree's logits must not depend on
its size for the lossless promise to hold).

    python benchmarks/compile_vs_fastpath.py --out runs/compile.json [--dtype auto] [--threads 2] [--context 200]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from blockdraft.bench.provenance import results_header

SIZES = (1, 8, 16)


def timed(call, rounds: int) -> float:
    runs = []
    for i in range(rounds + 1):
        began = time.perf_counter()
        call()
        if i:  # the first run warms up (and compiles)
            runs.append(time.perf_counter() - began)
    return 1000 * statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--dtype", default="auto", help="as blockdraft.load's (default: auto, the package's default)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import blockdraft
    from blockdraft.sizing import measure_cost_curve
    from transformers import StaticCache

    results = {**results_header(args.threads), "context": args.context, "ms_per_forward": {}}
    dec = blockdraft.load(dtype=args.dtype)
    results["dtype"] = dec.loaded.dtype_name
    curve = measure_cost_curve(dec.target, sizes=SIZES, context=args.context, rounds=args.rounds)
    results["ms_per_forward"]["blockdraft"] = {n: round(1000 * s, 2) for n, s in zip(curve.tokens, curve.seconds)}
    print("blockdraft", results["ms_per_forward"]["blockdraft"], file=sys.stderr)

    model = dec.loaded.model.eval()  # transformers' forward over the same weights (kept alive with `dec`)
    vocab = model.config.vocab_size
    filler = torch.tensor([[(t * 7919 + 100) % vocab for t in range(args.context + max(SIZES))]])
    cache = StaticCache(config=model.config, max_cache_len=args.context + 4 * max(SIZES))

    def forward(fn, n: int):
        for layer in cache.layers:  # back to the prefilled context: every call sees the same cache
            layer.cumulative_length.fill_(args.context)
        positions = torch.arange(args.context, args.context + n)[None]
        return fn(input_ids=filler[:, args.context: args.context + n], cache=cache, position_ids=positions,
                  use_cache=True).logits

    with torch.inference_mode():
        model(input_ids=filler[:, : args.context], cache=cache, position_ids=torch.arange(args.context)[None])
        eager = {n: forward(model, n) for n in SIZES}
        results["ms_per_forward"]["eager"] = {n: round(timed(lambda: forward(model, n), args.rounds), 2) for n in SIZES}
        print("eager", results["ms_per_forward"]["eager"], file=sys.stderr)
        import torch._inductor.config as inductor

        inductor.freezing = True
        compiled_model = torch.compile(model, dynamic=False)
        began = time.perf_counter()
        compiled = {n: forward(compiled_model, n) for n in SIZES}
        results["compile_seconds"] = round(time.perf_counter() - began, 1)
        results["ms_per_forward"]["compiled"] = {n: round(timed(lambda: forward(compiled_model, n), args.rounds), 2)
                                                 for n in SIZES}
        print("compiled", results["ms_per_forward"]["compiled"], file=sys.stderr)
    results["exactness"] = {
        "same_greedy_token_as_eager": {n: float((compiled[n].argmax(-1) == eager[n].argmax(-1)).float().mean())
                                       for n in SIZES},
        "max_abs_logit_diff_vs_eager": {n: float((compiled[n] - eager[n]).abs().max()) for n in SIZES},
        # the first position's logits alone vs in a 16-token call: equal bit for bit or not
        "first_token_logits_equal_alone_and_in_16": bool(torch.equal(compiled[1][0, 0], compiled[16][0, 0])),
        "first_token_max_abs_diff_alone_vs_in_16": float((compiled[1][0, 0] - compiled[16][0, 0]).abs().max()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("ms_per_forward", "compile_seconds", "exactness")}, indent=1))


if __name__ == "__main__":
    main()
