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
from collections.abc import Callable
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


def measure(formats_of: Callable[[torch.Tensor], dict], rounds: int, rows: tuple[int, ...] = ROWS) -> dict:
    """ms for LAYERS layers' four products by row count, each format in `formats_of(weight)`
    (medians of interleaved rounds: a busy moment hits every format alike), and whether a row's
    result depends on the row count (1-128 rows, gate|up)."""
    g = torch.Generator().manual_seed(0)
    layers = [{name: formats_of(torch.randn(*shape, generator=g) * 0.02) for name, shape in SHAPES.items()}
              for _ in range(LAYERS)]
    names = list(layers[0]["qkv"])
    inputs = {n: {k: torch.randn(n, k, generator=g).bfloat16() for k in (576, 1536)} for n in rows}

    def body(fmt: str, n: int) -> float:
        start = time.perf_counter()
        for layer in layers:
            for name, (_, k) in SHAPES.items():
                layer[name][fmt](inputs[n][k])
        return time.perf_counter() - start

    times = {fmt: {n: [] for n in rows} for fmt in names}
    for _ in range(rounds):
        for n in rows:
            for fmt in names:
                times[fmt][n].append(body(fmt, n))
    ms = {fmt: {n: round(1000 * statistics.median(t), 2) for n, t in per.items()} for fmt, per in times.items()}
    exact = {}
    x = torch.randn(128, 576, generator=g).bfloat16()
    for fmt in names:
        product = layers[0]["gate_up"][fmt]
        alone = torch.cat([product(x[i: i + 1]) for i in range(128)])
        differs = [n for n in range(2, 129) if not torch.equal(product(x[:n]), alone[:n])]
        exact[fmt] = "every row count 1-128" if not differs else f"differs from {differs[0]} rows"
    return {"ms_for_30_layers_by_rows": ms, "row_result_independent_of_row_count (gate|up)": exact}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {**results_header(args.threads), **measure(formats, args.rounds)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k not in ("command", "date", "machine")}, indent=1))


if __name__ == "__main__":
    main()
