"""Line-numbered JSONL reading: every bad line is reported with its number, never a traceback."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Iterator

from .errors import BlockdraftError


def read_jsonl(path: str | Path, validate: Callable[[dict], str | None] | None = None,
               on_error: str = "stop") -> Iterator[tuple[int, dict]]:
    """Yield (line number, record). `validate` returns an error text or None.

    on_error="stop" raises BlockdraftError naming the line; "skip" warns on stderr and goes on;
    "quiet" goes on without a word.
    """
    path = Path(path)
    if not path.is_file():
        raise BlockdraftError(f"no such file: {path}")
    with path.open("rb") as handle:  # bytes: a line that is not UTF-8 is reported like any bad line
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line, record, problem = None, None, "not UTF-8 text (a binary file?)"
            if line is not None:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    problem = None if isinstance(record, dict) else "not a JSON object"
                except json.JSONDecodeError as exc:
                    record, problem = None, f"invalid JSON ({exc.msg})"
            if problem is None and validate is not None:
                problem = validate(record)
            if problem is None:
                yield number, record
            elif on_error == "quiet":
                continue
            elif on_error == "skip":
                print(f"[blockdraft] {path}:{number}: {problem}; line skipped", file=sys.stderr)
            else:
                raise BlockdraftError(f"{path}:{number}: {problem}")
