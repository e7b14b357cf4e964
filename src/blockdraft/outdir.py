"""Output folders that hold one run each: checked before any work, locked while written.

A run writes into a new or empty folder; a folder holding anything else is refused in one line
(a user's files are never overwritten). `resume` accepts a folder holding only what this kind of
run writes itself (the caller then checks it is the same run). While a run writes, `.lock`
holds its process id: a second run on the same folder is refused, and a lock left by a process
that no longer exists is taken over.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import BlockdraftError

LOCK = ".lock"


def check_free(folder: str | Path, own: frozenset[str] = frozenset(), resume: bool = False,
               marker: str | None = None) -> Path:
    """The folder as a Path, if a run may write there: missing, empty, or (resume) holding only
    `own` names, `marker` among them (the file that says a run of this kind wrote the rest)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise BlockdraftError(f"--out {folder} is a file, not a folder")
    if folder.is_dir():
        held = sorted(p.name for p in folder.iterdir() if p.name != LOCK)
        foreign = [name for name in held if name not in own] if resume else held
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            hint = "; --resume continues the run there" if not resume and own and set(held) <= own else ""
            raise BlockdraftError(f"--out {folder} is not empty (it holds {shown}): choose a new folder{hint}")
        if resume and held and marker is not None and marker not in held:
            raise BlockdraftError(f"--out {folder} holds no run to resume (no {marker}) but other files: "
                                  "choose a new folder")
    parent = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BlockdraftError(f"--out {folder}: {parent} is not writable")
    return folder


class FolderLock:
    """`.lock` in a folder for the length of a run (a context manager)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK

    def __enter__(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = _holder(self.path)
                if holder is not None and _alive(holder):
                    raise BlockdraftError(f"another run (process {holder}) is writing to {self.path.parent}; "
                                          "wait for it or choose another --out") from None
                self.path.unlink(missing_ok=True)  # left by a process that has gone
                continue
            with os.fdopen(fd, "w") as out:
                out.write(f"{os.getpid()}\n")
            return self
        raise BlockdraftError(f"cannot lock {self.path.parent}: another run keeps taking it")

    def __exit__(self, *exc) -> None:
        if _holder(self.path) == os.getpid():
            self.path.unlink(missing_ok=True)


def _holder(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
