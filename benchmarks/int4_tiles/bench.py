"""An experiment kept for whoever tries next: our own 4-bit kernel on AMX bfloat16 tiles
(int4_tiles.cpp beside this file) against torch's `_weight_int4pack_mm_for_cpu`.

Why: torch's 4-bit kernel decodes the weights again for every 4 rows, so a drafted tree's
verification costs 4x one token's products at 16 rows. This kernel decodes each group's codes
once into a bfloat16 tile and multiplies all rows (up to 16) by it; each row's arithmetic is the
same whatever the other rows, so it keeps drafted decoding exact. Measured here (docs/research.md):
flat in the rows but ~1.8x torch's cost for one row, so `ar` lost more than `fast` gained and the
package keeps torch's kernel. Needs Linux, AMX, a C++ compiler and ninja; built with torch's
C++ extension tools into $BLOCKDRAFT_CACHE/kernels.

    python benchmarks/int4_tiles/bench.py products --out runs/int4-tiles-products.json
    python benchmarks/int4_tiles/bench.py curves --out runs/int4-tiles-curves.json
    python benchmarks/int4_tiles/bench.py cli bench --per-category 1 --methods ar,fast --out runs/ab-tiles
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

from blockdraft.bench.provenance import results_header
from blockdraft.int4 import GROUP, FourBitWeight, Int4Weight, group_levels
from blockdraft.models import cache_root

SOURCE = Path(__file__).with_name("int4_tiles.cpp")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16",
         "-mf16c", "-mfma"]
COLS = 16  # outputs per block of the kernel's layout
ROWS = (1, 2, 4, 8, 12, 16, 32)


def build():
    """The compiled kernel module (built once per source and torch version, ~25 s)."""
    from torch.utils.cpp_extension import load

    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([torch.__version__, *FLAGS]).encode()).hexdigest()[:12]
    folder = cache_root() / "kernels" / f"int4_tiles-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    module = load(name="blockdraft_int4_tiles", sources=[str(SOURCE)], extra_cflags=FLAGS, build_directory=str(folder))
    if not module.available():
        sys.exit("int4 tiles: this CPU or kernel grants no AMX state")
    return module


KERNEL = None


class TileInt4Weight(FourBitWeight):
    """A weight in the kernel's layout: per block of 16 outputs and group of 32 inputs, 256 bytes
    of codes (byte 16p + c: output c's inputs 2p and 2p + 1 as low and high nibble), then the 16
    steps and 16 minimums as float16; w = code * step + minimum."""

    dense_rows = 128  # the tiles decode again for every 16 rows: dense from here for a prefill

    def __init__(self, blocks: torch.Tensor, out_features: int, in_features: int):
        self.blocks, self.out_features, self.in_features = blocks, out_features, in_features

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> TileInt4Weight:
        codes, step, low = group_levels(weight)
        out_features, in_features = weight.shape
        blocks, groups = out_features // COLS, in_features // GROUP
        pairs = codes.to(torch.uint8).view(blocks, COLS, groups, GROUP // 2, 2).permute(0, 2, 3, 1, 4)
        code_bytes = (pairs[..., 0] | (pairs[..., 1] << 4)).reshape(blocks, groups, -1)

        def per_block(values: torch.Tensor) -> torch.Tensor:  # [out, groups] -> [blocks, groups, 32 bytes]
            return values.half().view(blocks, COLS, groups).transpose(1, 2).contiguous().view(torch.uint8)

        return cls(torch.cat([code_bytes, per_block(step), per_block(low)], -1).contiguous(), out_features, in_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return KERNEL.matmul(x.reshape(-1, shape[-1]).contiguous(), self.blocks).reshape(*shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """code * step + minimum in float32, rounded to bfloat16 (for a prefill's dense product)."""
        blocks, groups = self.blocks.shape[:2]
        code_bytes = self.blocks[..., : GROUP * COLS // 2].view(blocks, groups, GROUP // 2, COLS)
        codes = torch.stack([code_bytes & 15, code_bytes >> 4], -1).permute(0, 3, 1, 2, 4)
        codes = codes.reshape(self.out_features, groups, GROUP).float()

        def per_output(start: int) -> torch.Tensor:
            values = self.blocks[..., start: start + 2 * COLS].contiguous().view(torch.float16)
            return values.float().transpose(1, 2).reshape(self.out_features, groups, 1)

        step, low = per_output(GROUP * COLS // 2), per_output(GROUP * COLS // 2 + 2 * COLS)
        return (codes * step + low).reshape(self.out_features, self.in_features).bfloat16()


def products(rounds: int) -> dict:
    """ms for the 30 layers' products by row count and whether a row's result depends on the row
    count: weight_formats.measure over torch's kernel and the tiles."""
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from weight_formats import measure

    return measure(lambda w: {"torch int4": Int4Weight.quantize(w), "AMX tiles int4": TileInt4Weight.quantize(w)},
                   rounds, ROWS)


def curves() -> dict:
    """The engine's step (ms) by tree size and context, the body's products through each kernel."""
    import blockdraft
    import blockdraft.fastpath
    from blockdraft.sizing import measure_cost_curve

    decoders = {}
    for kind, cls in (("torch int4", Int4Weight), ("AMX tiles int4", TileInt4Weight)):
        blockdraft.fastpath.Int4Weight = cls  # the fast path's 4-bit weights (an experiment's swap)
        decoders[kind] = blockdraft.load(dtype="int4")
    blockdraft.fastpath.Int4Weight = Int4Weight
    sizes, out = (1, 2, 4, 8, 12, 16, 24, 32), {}
    for context in (128, 512, 2048):
        for kind, dec in decoders.items():
            curve = measure_cost_curve(dec.target, sizes=sizes, context=context, rounds=7)
            out.setdefault(kind, {})[context] = dict(zip(sizes, [round(1000 * s, 1) for s in curve.seconds]))
            print(kind, context, out[kind][context], file=sys.stderr)
    return {"ms_by_tokens_at_context": out}


def main() -> None:
    global KERNEL
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("products", "curves", "cli"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    args, rest = ap.parse_known_args()
    KERNEL = build()
    torch.set_num_threads(args.threads)
    if args.what == "cli":  # blockdraft's command line with the body's 4-bit products on the tiles
        import blockdraft.fastpath
        from blockdraft.cli import main as cli

        blockdraft.fastpath.Int4Weight = TileInt4Weight
        sys.exit(cli(rest))
    results = products(args.rounds) if args.what == "products" else curves()
    results.update(results_header(args.threads))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
