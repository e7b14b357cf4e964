"""Each method's peak resident memory, measured in a process of its own.

A bench run interleaves every method in one process, so that process's peak is the hungriest
method's plus whatever the others keep loaded. A method's own peak needs a fresh process: load
the model as the bench did, set up that method alone, answer one prompt, report the process's
peak resident set (what `/usr/bin/time -v` calls maximum resident set size).

The child is `python -m blockdraft.bench.own_process REQUEST` (REQUEST: JSON with the load
arguments, the method, the prompt ids and max_new_tokens).
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

CHILD_TIMEOUT_S = 900


def own_process_peaks(spec: dict, methods: list[str], ids: list[int], max_new_tokens: int) -> dict[str, dict]:
    """{method: {"peak_rss_mb": MB} or {"error": one line}} for each method, each in a new process.

    spec: how the bench loaded its decoder (model, heads, eagle, dtype, device, threads)."""
    out = {}
    for method in methods:
        request = json.dumps(spec | {"method": method, "ids": ids, "max_new_tokens": max_new_tokens})
        try:
            done = subprocess.run([sys.executable, "-m", "blockdraft.bench.own_process", request], capture_output=True,
                                  text=True, timeout=CHILD_TIMEOUT_S)
            lines = done.stdout.strip().splitlines()
            out[method] = json.loads(lines[-1]) if done.returncode == 0 and lines else \
                {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:200]}
        except subprocess.TimeoutExpired:
            out[method] = {"error": f"no answer within {CHILD_TIMEOUT_S} s"}
    return out


def peak_rss_mb() -> float:
    """This process's peak resident set so far (the bench's own, and each child's): Linux's VmHWM
    (/proc/self/status), which starts afresh at exec. Not getrusage's ru_maxrss: Linux carries that over from the parent that
    forked this process, so every child of a 2.9 GB bench reported 2.9 GB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
