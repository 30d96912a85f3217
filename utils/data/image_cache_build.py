"""Building the decoded-image cache: decode every image of a file list once (in parallel) into a cache entry.

``build_image_cache`` writes an entry (layout, location and key: ``utils.data.image_cache``);
``cached_image_dataset`` builds it if needed and opens it as a ``CachedImages``.

Rules:

* **One fixed size.** Every image is stored at ``image_size`` (H, W); by default the size of the first readable
  image of the list (64x64 for TinyImageNet). Images of another size are resized to it with PIL bicubic (the aspect
  ratio is not kept), so use the cache for datasets of (mostly) one size.
* **Latest entry per name.** A finished build deletes the other entries of the same ``name`` in the folder (they
  describe older versions of the same data), so a folder holds at most one entry per name.
* **Atomic.** An entry is written in a hidden ``.building-*`` folder, flushed, and renamed into place only when
  complete (manifest last), so an interrupted build never leaves an entry that looks valid; its leftovers are
  removed by the next build. Concurrent builds (e.g. several DDP ranks) are safe, just wasteful: the first rename
  wins and the others use its result. Better: build on rank 0, barrier, then open on every rank.
* **Decode processes.** ``num_workers`` processes (default ``default_num_workers()``; the environment variable
  ``TINYDINO_CACHE_WORKERS`` sets it instead), fed chunks of at most 128 images; a list of one chunk is decoded
  in-process unless ``TINYDINO_CACHE_WORKERS`` is set, which splits the list so that every process gets work. The
  processes reset the handlers of SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 to the defaults (a handler inherited from
  the parent, e.g. one that ignores SIGTERM, never keeps them alive); a finished pool is shut down and joined, never
  terminated. A decode process that dies (killed, out of memory) fails the build with a ``RuntimeError``.
* **Unreadable images are skipped.** A file PIL cannot open or decode (corrupt, truncated, vanished) is left out
  with a warning giving the count; the cache's length is the number of good images, ``CachedImages.indices`` maps
  rows back to the sample list and the manifest lists the skipped files.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import struct
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from PIL import Image

from utils.data.download import progress_bar
from utils.data.image_cache import (
    _IMAGES,
    _INDICES,
    _LABELS,
    _MANIFEST,
    FORMAT_VERSION,
    CachedImages,
    _entry_is_valid,
    _normalize_size,
    cache_key,
)
from utils.runtime.errors import DatasetError, UsageError
from utils.runtime.files import fsync_path

__all__ = [
    "WORKERS_ENV",
    "build_image_cache",
    "cached_image_dataset",
    "default_num_workers",
]

WORKERS_ENV = "TINYDINO_CACHE_WORKERS"  # decode processes; set, it also splits a small list over all of them
_BUILDING_PREFIX = ".building-"
_OWNER = "owner.json"  # in a .building-* folder: host and pid of the build, to tell dead builds from running ones
_CHUNK = 128  # images per task handed to a worker
_NAME_RE = re.compile(r"^[A-Za-z0-9_.]+$")

# Errors that mean "this file is not a readable image" (skip it); anything else aborts the build.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


def default_num_workers() -> int:
    """``min(4, usable CPU cores)``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


# --------------------------------------------------------------------------------------------------------------------
# decoding (runs in worker processes)
# --------------------------------------------------------------------------------------------------------------------


def _decode_image(path: str, size: tuple[int, int] | None) -> np.ndarray:
    """Decode ``path`` as RGB uint8 ``[H, W, 3]``, resized (bicubic) to ``size`` = (H, W) when given and different."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img = img.convert("RGB")
    if size is not None and (img.height, img.width) != size:
        img = img.resize((size[1], size[0]), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def _decode_chunk(task: tuple[str, int, list[str], tuple[int, int]]) -> list[tuple[int, str | None]]:
    """Decode ``paths`` into rows ``start...`` of the ``[N, 3, H, W]`` memmap at ``npy_path``.

    Returns ``(row, error)`` per image, ``error`` None when the row was written. Only decoding errors are caught.
    """
    npy_path, start, paths, size = task
    images = np.load(npy_path, mmap_mode="r+")
    results = []
    for offset, path in enumerate(paths):
        row = start + offset
        try:
            pixels = _decode_image(path, size)
        except _DECODE_ERRORS as exc:
            results.append((row, f"{type(exc).__name__}: {exc}"))
            continue
        images[row] = pixels.transpose(2, 0, 1)
        results.append((row, None))
    del images  # unmap; the pages are shared with the parent through the page cache
    return results


def _first_image_size(paths: Sequence[str]) -> tuple[int, int]:
    """(H, W) of the first file PIL can open (header only)."""
    for path in paths:
        try:
            with Image.open(path) as img:
                return img.height, img.width
        except _DECODE_ERRORS:
            continue
    raise DatasetError(f"none of the {len(paths)} images could be opened, nothing to cache")


def _mp_context():
    """``fork`` where available (workers start instantly and need no re-import), else ``spawn``."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods and sys.platform != "darwin" else "spawn")


def _reset_signal_handlers() -> None:
    """Pool initializer: the default action for the signals a parent (a job launcher, our own stop handling) may
    have installed handlers for, so ``terminate()`` and Ctrl-C end a worker whatever the parent did."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)


def _worker_count(num_workers: int | None) -> tuple[int, bool]:
    """``(processes, forced)``: ``num_workers``, else ``$TINYDINO_CACHE_WORKERS`` (forced: split small lists too),
    else ``default_num_workers()``."""
    if num_workers is not None:
        return max(0, int(num_workers)), False
    value = os.environ.get(WORKERS_ENV, "").strip()
    if not value:
        return default_num_workers(), False
    if not value.isdigit():
        raise UsageError(f"{WORKERS_ENV} must be a whole number of processes (0: decode in-process), got {value!r}")
    return int(value), True


# --------------------------------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------------------------------


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_builds(cache_dir: Path, max_age_s: float = 24 * 3600) -> None:
    """Delete ``.building-*`` folders of dead builds: started on this host by a process that no longer exists, or
    (other hosts, unknown owner) not modified for ``max_age_s``."""
    host = socket.gethostname()
    for path in cache_dir.glob(_BUILDING_PREFIX + "*"):
        try:
            owner = json.loads((path / _OWNER).read_text())
            local_pid = int(owner["pid"]) if owner["host"] == host else None
        except (OSError, ValueError, KeyError, TypeError):
            local_pid = None
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            continue
        if (not _pid_alive(local_pid)) if local_pid is not None else age > max_age_s:
            shutil.rmtree(path, ignore_errors=True)


def _remove_other_entries(cache_dir: Path, name: str, keep: Path) -> None:
    """Delete the entries of ``name`` other than ``keep`` (older versions of the same data)."""
    pattern = re.compile(rf"^{re.escape(name)}-[0-9a-f]{{16}}$")
    for path in cache_dir.iterdir():
        if path != keep and path.is_dir() and pattern.match(path.name):
            shutil.rmtree(path, ignore_errors=True)


def _decode_all(
    npy_path: Path, paths: list[str], size: tuple[int, int], num_workers: int, split: bool, progress
) -> dict[int, str]:
    """Decode every path into its row of ``npy_path``; return {row: error} of the images that failed.

    Chunks of at most ``_CHUNK`` images; ``split``: small enough that each of the ``num_workers`` processes gets one.
    """
    chunk = min(_CHUNK, -(-len(paths) // max(num_workers, 1))) if split else _CHUNK
    tasks = [(str(npy_path), s, paths[s : s + chunk], size) for s in range(0, len(paths), chunk)]
    errors: dict[int, str] = {}

    def consume(results: Iterable[list[tuple[int, str | None]]]) -> None:
        for chunk in results:
            errors.update({row: err for row, err in chunk if err is not None})
            progress.update(len(chunk))

    workers = min(num_workers, len(tasks))
    if workers <= 1:
        consume(map(_decode_chunk, tasks))
        return errors
    pool = ProcessPoolExecutor(workers, mp_context=_mp_context(), initializer=_reset_signal_handlers)
    try:
        consume(future.result() for future in as_completed([pool.submit(_decode_chunk, task) for task in tasks]))
    except BrokenProcessPool as exc:
        raise RuntimeError(
            f"a decode process of the image cache died ({exc}); rerun, or decode in-process with "
            f"{WORKERS_ENV}=0 if the machine is short of memory"
        ) from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # joins the workers; chunks not yet started are dropped
    return errors


def _compact(src: Path, dst: Path, keep: np.ndarray, chunk: int = 4096) -> None:
    """Write rows ``keep`` of the ``.npy`` at ``src`` to a new ``.npy`` at ``dst`` (chunked, memory-mapped)."""
    source = np.load(src, mmap_mode="r")
    out = np.lib.format.open_memmap(dst, mode="w+", dtype=np.uint8, shape=(len(keep), *source.shape[1:]))
    for s in range(0, len(keep), chunk):
        out[s : s + chunk] = source[keep[s : s + chunk]]
    out.flush()
    del out, source


def build_image_cache(
    samples: Sequence[tuple[str, int]],
    cache_dir,
    image_size: int | tuple[int, int] | None = None,
    num_workers: int | None = None,
    *,
    name: str = "images",
    root=None,
    classes: Sequence[str] | None = None,
    verbose: bool = True,
) -> Path:
    """Make sure ``cache_dir`` holds the decoded cache of ``samples`` and return its entry folder.

    ``samples`` is a list of ``(path, label)`` such as ``ImageFolder.samples``. When a valid entry for the current
    key exists it is returned without decoding anything (only every file is stat'ed). Otherwise every image is
    decoded (``num_workers`` processes; ``None``: ``$TINYDINO_CACHE_WORKERS`` when set, else
    ``default_num_workers()``; ``0`` or ``1``: in-process) into a new entry, which replaces the older entries of
    ``name``.

    ``image_size``: ``None`` (size of the first readable image), an int (square) or ``(H, W)``; every image is stored
    at that size. ``root``: the folder paths are made relative to for the key (default: their common folder).
    ``classes``: class names stored in the manifest (``CachedImages.classes``). Raises ``DatasetError`` when the
    folder cannot be written or no image can be decoded.
    """
    if not _NAME_RE.match(name):
        raise ValueError(f"name must match {_NAME_RE.pattern} (no '-'), got {name!r}")
    samples = [(str(p), int(label)) for p, label in samples]
    size = _normalize_size(image_size)
    key = cache_key(samples, root=root, image_size=size)
    cache_dir = Path(cache_dir).expanduser()
    entry = cache_dir / f"{name}-{key[:16]}"
    if _entry_is_valid(entry, key):
        return entry

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(cache_dir)
        tmp = cache_dir / f"{_BUILDING_PREFIX}{name}-{key[:16]}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        (tmp / _OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    except OSError as exc:
        raise DatasetError(f"cannot write the image cache in {cache_dir} ({exc}): pass another --cache_dir") from exc

    try:
        paths = [p for p, _ in samples]
        n = len(paths)
        size = size if size is not None else _first_image_size(paths)
        workers, forced = _worker_count(num_workers)
        if verbose:
            print(
                f"caching {n} images of {name!r} at {size[0]}x{size[1]} into {entry} ({max(workers, 1)} process(es))",
                file=sys.stderr,
                flush=True,
            )
        full = tmp / "images.full.npy"
        np.lib.format.open_memmap(full, mode="w+", dtype=np.uint8, shape=(n, 3, *size)).flush()
        with progress_bar(n, f"caching {name}", unit="img", enabled=verbose) as progress:
            errors = _decode_all(full, paths, size, workers, forced, progress)

        keep = np.array([i for i in range(n) if i not in errors], dtype=np.int64)
        if len(keep) == 0:
            raise DatasetError(f"none of the {n} images of {name!r} could be decoded, nothing to cache")
        if errors:
            _compact(full, tmp / _IMAGES, keep)
            full.unlink()
            first = min(errors)
            warnings.warn(
                f"image cache {name!r}: {len(errors)} of {n} images could not be decoded and are left out "
                f"(e.g. {paths[first]}: {errors[first]}); the cache holds {len(keep)} images",
                stacklevel=2,
            )
        else:
            os.replace(full, tmp / _IMAGES)
        fsync_path(tmp / _IMAGES)
        labels = np.array([samples[i][1] for i in keep], dtype=np.int64)
        _save_npy(tmp / _LABELS, labels)
        _save_npy(tmp / _INDICES, keep)
        manifest = {
            "format_version": FORMAT_VERSION,
            "key": key,
            "name": name,
            "num_images": int(len(keep)),
            "num_samples": n,
            "height": size[0],
            "width": size[1],
            "layout": "NCHW",
            "classes": list(classes) if classes is not None else [],
            "skipped": [{"index": i, "path": paths[i], "error": errors[i]} for i in sorted(errors)],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        tmp_manifest = tmp / (_MANIFEST + ".tmp")
        tmp_manifest.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp_manifest, tmp / _MANIFEST)
        (tmp / _OWNER).unlink()

        if entry.exists() and not _entry_is_valid(entry, key):
            shutil.rmtree(entry, ignore_errors=True)  # a damaged entry of the same key
        try:
            os.rename(tmp, entry)
        except OSError:
            if not _entry_is_valid(entry, key):  # lost a race against a concurrent build that produced junk
                raise
            # else: a concurrent build of the same key finished first; use its entry, drop ours below
        _remove_other_entries(cache_dir, name, keep=entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return entry


def cached_image_dataset(
    dataset,
    cache_dir,
    *,
    name: str = "images",
    image_size: int | tuple[int, int] | None = None,
    num_workers: int | None = None,
    transform: Callable | None = None,
    verbose: bool = True,
) -> CachedImages:
    """Build (if needed) and open the cache of an ``ImageFolder``-like ``dataset`` (anything with ``.samples``).

    The key's ``root`` is ``dataset.root`` when it has one; ``dataset.classes`` are stored with the cache.
    """
    samples = getattr(dataset, "samples", None)
    if samples is None:
        raise TypeError(f"{type(dataset).__name__} has no .samples list of (path, label); cannot cache it")
    entry = build_image_cache(
        samples,
        cache_dir,
        image_size=image_size,
        num_workers=num_workers,
        name=name,
        root=getattr(dataset, "root", None),
        classes=getattr(dataset, "classes", None),
        verbose=verbose,
    )
    return CachedImages(entry, transform=transform)
