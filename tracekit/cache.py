"""tracekit's one cache root and safe writes into it.

Everything tracekit caches lives under ``$TRACEKIT_CACHE`` (default ``~/.cache/tracekit``):
context templates, sampled corpora, key statistics, and downloaded datasets (``data/``).
Entries are written through a temporary file and a rename, so a crash never leaves half
of one, and work that two processes could do at once takes a lock on its entry.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterator


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache root: ``override``, else ``$TRACEKIT_CACHE``, else ``~/.cache/tracekit``."""
    root = override or os.environ.get("TRACEKIT_CACHE") or Path.home() / ".cache" / "tracekit"
    return Path(root).expanduser()


def slug(text: str) -> str:
    """A file-name-safe version of a spec or path."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_")[:80] or "model"


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``'s entry (a ``.lock`` file beside it) while the block runs,
    so a second process doing the same work waits and then finds it done. Where the platform
    has no ``fcntl`` (Windows), the block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
