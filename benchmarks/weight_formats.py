"""Weight formats for the decoder body's products on this CPU: time per row count, and whether a
row's result depends on how many rows share the product (drafted decoding needs it not to).

Why: a decode step reads every weight once, so bytes per weight set the single-token step, while
a verification call multiplies 2-30 rows by the same weights. This times the 30 layers' four
projections of SmolLM2-135M (q|k|v 960 x 576, o 576 x 576, gate|up 3,072 x 576, down 576 x 1,536),
each layer's weights distinct so that they stream from memory as in a real step (medians of
interleaved rounds), in: float32 and bfloat16 packed for oneDNN (as the fast path runs them),
int8 per output channel (`_weight_int8pack_mm`) and 4 bits in groups of 32 (blockdraft.int4,
`_weight_int4pack_mm_for_cpu`), with bfloat16 inputs for the last two.

    python benchmarks/weight_formats.py --out docs/results/weight-formats/weight-formats.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from blockdraft.bench.provenance import results_header
from blockdraft.cpu import pack_weight, packed_linear
from blockdraft.int4 import Int4Weight

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
LAYERS = 30
ROWS = (1, 2, 4, 8, 16, 32)


class Int8Weight:
    """Symmetric int8 codes with one bfloat16 scale per output channel."""

    def __init__(self, weight: torch.Tensor):
        scale = weight.abs().amax(1).clamp_min(1e-8) / 127
        self.codes = (weight / scale[:, None]).round().to(torch.int8)
        self.scale = scale.to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.codes, self.scale)


def formats(weight: torch.Tensor) -> dict:
    """One weight [out, in] in each format, as a function of a [rows, in] input."""
    f32, bf16 = pack_weight(weight), pack_weight(weight.bfloat16())
    return {"float32 (oneDNN)": lambda x: packed_linear(x.float(), f32),
            "bfloat16 (oneDNN)": lambda x: packed_linear(x, bf16),
            "int8 per channel": Int8Weight(weight), "int4 groups of 32": Int4Weight.quantize(weight)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    layers = [{name: formats(torch.randn(*shape, generator=g) * 0.02) for name, shape in SHAPES.items()}
              for _ in range(LAYERS)]
    names = list(layers[0]["qkv"])
    inputs = {rows: {k: torch.randn(rows, k, generator=g).bfloat16() for k in (576, 1536)} for rows in ROWS}

    def body(fmt: str, rows: int) -> float:
        start = time.perf_counter()
        for layer in layers:
            for name, (_, k) in SHAPES.items():
                layer[name][fmt](inputs[rows][k])
        return time.perf_counter() - start

    times = {fmt: {rows: [] for rows in ROWS} for fmt in names}
    for _ in range(args.rounds):  # interleaved: a busy moment hits every format alike
        for rows in ROWS:
            for fmt in names:
                times[fmt][rows].append(body(fmt, rows))
    ms = {fmt: {rows: round(1000 * statistics.median(t), 2) for rows, t in per.items()} for fmt, per in times.items()}
    exact = {}
    x = torch.randn(128, 576, generator=g).bfloat16()
    for fmt in names:
        product = layers[0]["gate_up"][fmt]
        alone = torch.cat([product(x[i: i + 1]) for i in range(128)])
        differs = [rows for rows in range(2, 129) if not torch.equal(product(x[:rows]), alone[:rows])]
        exact[fmt] = "every row count 1-128" if not differs else f"differs from {differs[0]} rows"
    results = {**results_header(args.threads), "ms_for_30_layers_by_rows": ms, "row_result_independent_of_row_count (gate|up)": exact}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({"ms": ms, "exact": exact}, indent=1))


if __name__ == "__main__":
    main()
