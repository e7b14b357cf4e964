"""Where a benchmark script's results came from: the command, the UTC time, the machine, threads
and torch, the header every results file under benchmarks/ starts with (numbers mean little
without them: machines differ from day to day)."""
from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path


def results_header(threads: int) -> dict:
    """command, date (UTC), machine (CPU model and count), threads, torch version."""
    import torch

    from ..cpu import cpu_model

    return {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{cpu_model()} ({os.cpu_count()} CPUs)", "threads": threads, "torch": torch.__version__}
