"""Writing a small file so that a crash never leaves a half-written one in its place."""
from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary sibling, flush it to disk, then rename it over ``path`` (``os.replace`` is
    atomic on POSIX and Windows): a reader, or a run resumed after a kill, sees the old file or the new one, never a
    part of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
