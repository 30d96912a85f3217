"""Fetching dataset files: a URL streamed to disk atomically, and the progress bar every data step shows (tqdm)."""

from __future__ import annotations

import contextlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from utils.runtime.errors import DatasetError

__all__ = ["download_url", "progress_bar"]


def progress_bar(total: int | None, desc: str, unit: str = "B", enabled: bool = True) -> tqdm:
    """A tqdm bar on stderr for ``total`` units (``None``: unknown), used as a context manager with ``update(n)``.

    ``unit="B"`` shows bytes with binary prefixes (KiB/s, MiB/s). On a terminal the bar redraws at most every 0.1 s;
    in a log file (stderr not a terminal) at most every 10 s, so long jobs do not fill their logs.
    ``enabled=False`` shows nothing.
    """
    interactive = getattr(sys.stderr, "isatty", lambda: False)()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
        file=sys.stderr,
        mininterval=0.1 if interactive else 10.0,
        disable=not enabled,
    )


def download_url(url: str, dest_path, chunk_size: int = 1 << 20) -> Path:
    """Stream ``url`` to ``dest_path`` with a progress bar and return ``dest_path``.

    Data goes to ``<dest_path>.part`` first and is renamed to ``dest_path`` only when complete (and, if the server
    sent a Content-Length, of that size), so ``dest_path`` never holds a partial file. Any failure removes the
    ``.part`` file and raises ``DatasetError`` telling the user to download the file by hand and where to put it.
    """
    dest_path = Path(dest_path)
    dest_path.parent.mkdir(parents=True, exist_ok=True)
    part_path = dest_path.with_name(dest_path.name + ".part")
    hint = f"download {url} by hand and put it at {dest_path}"
    done = False
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            written = 0
            with open(part_path, "wb") as out, progress_bar(total, f"downloading {dest_path.name}") as bar:
                while chunk := response.read(chunk_size):
                    out.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
        if total is not None and written != total:
            raise DatasetError(f"download of {url} stopped after {written} of {total} bytes: {hint}")
        os.replace(part_path, dest_path)
        done = True
    except DatasetError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:  # URLError/HTTPError/timeouts/disk full/bad URL
        raise DatasetError(f"download of {url} failed ({exc}): {hint}") from exc
    finally:
        if not done:
            with contextlib.suppress(OSError):
                part_path.unlink()
    return dest_path
