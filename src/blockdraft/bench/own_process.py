"""One method's peak resident memory in this process: the child that bench.memory starts.

    python -m blockdraft.bench.own_process '{"model": "smollm2-135m", "method": "fast", "ids": [1, 2], "max_new_tokens": 8}'

prints one JSON line: {"peak_rss_mb": MB} (what `/usr/bin/time -v` calls maximum resident set
size), or {"error": one line} when the method cannot run here.
"""
from __future__ import annotations

import json
import sys

from .memory import peak_rss_mb


def main(argv: list[str]) -> int:
    import torch

    import blockdraft
    from ..errors import BlockdraftError
    from .runner import setup

    spec = json.loads(argv[0])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    try:
        dec = blockdraft.load(spec["model"], heads=spec.get("heads") or "default", dtype=spec.get("dtype", "float32"),
                              device=spec.get("device"), eagle=spec.get("eagle"), offline=True)
        runners, skipped = setup(dec, [spec["method"]])
        if skipped:
            print(json.dumps({"error": next(iter(skipped.values()))}))
            return 0
        runners[spec["method"]](spec["ids"], spec["max_new_tokens"])
    except BlockdraftError as exc:
        print(json.dumps({"error": str(exc)[:200]}))
        return 0
    print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
