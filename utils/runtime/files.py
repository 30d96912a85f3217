"""Durable writes: flushing a file, or a folder after a rename in it, to disk."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """Flush ``path`` to disk: a file's data, or a folder's entries (so that a rename into it survives a crash).

    A folder that cannot be opened or synced (Windows, some network file systems) is skipped; for a file the
    ``OSError`` is raised."""
    path = Path(path)
    folder = path.is_dir()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not folder:
            raise
    finally:
        os.close(fd)
