"""Peak resident memory of one generation by answer length: does memory grow with the answer?

Each length runs in a fresh Python process (peak RSS is per process): load the default model,
generate N new tokens with a method from a raw text prompt that keeps going (a counting list),
print the tokens made, the peak RSS (getrusage) and the KV cache's share. The fast path's KV
cache grows by doubling, so memory may grow with the context by design, at 2 x layers x kv heads
x head size x 4 bytes per position (46 KB for SmolLM2-135M in float32).

    python benchmarks/rss_by_length.py --method fast --lengths 64,2000 [--json runs/rss.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys
import blockdraft
method, n = sys.argv[1], int(sys.argv[2])
dec = blockdraft.load()
prompt = ", ".join(str(i) for i in range(1, 40)) + ","
result = dec.generate(prompt, method=method, max_new_tokens=n, raw=True)
cfg = dec.loaded.model.config
per_position = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
print(json.dumps({"method": method, "asked": n, "new_tokens": result.new_tokens, "stop_reason": result.stop_reason,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "kv_mb_per_1000_positions": per_position * 1000 / 2 ** 20}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="fast")
    parser.add_argument("--lengths", default="64,2000")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        out = subprocess.run([sys.executable, "-c", CHILD, args.method, str(n)], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    if len(rows) > 1:
        print(f"peak RSS {rows[-1]['peak_rss_mb']:.0f} MB at {rows[-1]['new_tokens']} tokens vs "
              f"{rows[0]['peak_rss_mb']:.0f} MB at {rows[0]['new_tokens']}: "
              f"{rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb'] - 1:+.1%}")
    if args.json:
        with open(args.json, "w") as sink:
            json.dump(rows, sink, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
