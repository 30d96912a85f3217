"""A decoded-image cache: decode a dataset's JPEGs once into a memory-mapped uint8 array on disk.

``build_image_cache`` decodes every image of a file list once (in parallel) into ``images.npy``; ``CachedImages``
reads it back memory-mapped, so later epochs and later runs decode no JPEG, and a batched augmentation can take
uint8 batches ``[B, 3, H, W]`` straight from it.

This module is the cache as stored: where it lives, its layout and key, and ``CachedImages``, which reads it.
``utils.data.image_cache_build`` writes it (``build_image_cache``, ``cached_image_dataset``).

Where: never inside the dataset. ``default_cache_dir(data_path)`` is a per-user folder,
``$XDG_CACHE_HOME/tinydino/<dataset folder name>-<hash of its absolute path>/`` (``~/.cache/tinydino/...`` when
``XDG_CACHE_HOME`` is unset or relative); ``--cache_dir`` replaces it. A read-only dataset is therefore cached like
any other.

Layout of a cache folder::

    <cache_dir>/<name>-<key[:16]>/      one entry: ``name`` says which dataset (e.g. "train"), key which version
        images.npy                      uint8 [N, 3, H, W] (NCHW: the layout batches are consumed in)
        labels.npy                      int64 [N]
        indices.npy                     int64 [N]: row i holds sample ``indices[i]`` of the list it was built from
        manifest.json                   format version, full key, N, H, W, classes, skipped files; written last

Rules:

* **Keyed by the file list.** The key hashes, in list order, every sample's (path relative to ``root``, size,
  mtime_ns, label), plus ``image_size`` and ``FORMAT_VERSION``: adding, removing, renaming, relabelling or touching
  a file gives a new key and a rebuild. Unchanged files give the same key and nothing is decoded. The order is part
  of the key because rows are stored in list order (row i = sample i, minus skipped files).

How entries are built (fixed size, atomic, decode processes, unreadable images): ``utils.data.image_cache_build``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from utils.runtime.errors import DatasetError

__all__ = [
    "FORMAT_VERSION",
    "CachedImages",
    "cache_key",
    "default_cache_dir",
]

FORMAT_VERSION = 1
_MANIFEST = "manifest.json"
_IMAGES = "images.npy"
_LABELS = "labels.npy"
_INDICES = "indices.npy"


def user_cache_root() -> Path:
    """``$XDG_CACHE_HOME/tinydino``, or ``~/.cache/tinydino`` when ``XDG_CACHE_HOME`` is unset or not absolute."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "tinydino"


def default_cache_dir(data_path) -> Path:
    """The cache folder of the dataset at ``data_path`` when no explicit one is given (outside the dataset).

    ``<user_cache_root()>/<folder name>-<first 12 hex digits of the SHA-256 of its resolved absolute path>``: one
    folder per dataset, the same however the path is spelled (relative, trailing slash, through a symlink).
    """
    path = Path(data_path).expanduser().resolve()
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.name) or "data"
    return user_cache_root() / f"{name}-{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"


def _normalize_size(image_size) -> tuple[int, int] | None:
    """``None``, an int (square) or ``(H, W)`` -> ``None`` or ``(H, W)``."""
    if image_size is None:
        return None
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    h, w = (int(v) for v in image_size)
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return h, w


def _common_root(paths: Sequence[str]) -> str:
    return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])


def cache_key(samples: Sequence[tuple[str, int]], root=None, image_size=None) -> str:
    """Hex SHA-256 of the sample list (relative path, size, mtime_ns, label, in list order), size and format.

    ``root`` (default: the common folder of all samples) makes the paths relative, so a data folder that is moved
    together with its cache keeps its key. A file that cannot be stat'ed hashes as size and mtime -1 (it is then
    skipped as unreadable when building).
    """
    samples = list(samples)
    if not samples:
        raise DatasetError("cannot cache an empty dataset")
    root = os.path.abspath(root) if root is not None else _common_root([p for p, _ in samples])
    h = hashlib.sha256()
    size = _normalize_size(image_size)
    h.update(json.dumps({"format_version": FORMAT_VERSION, "image_size": size}).encode())
    for path, label in samples:
        try:
            st = os.stat(path)
            stamp = (st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = (-1, -1)
        rel = os.path.relpath(os.path.abspath(path), root)
        h.update(f"\n{rel}\0{stamp[0]}\0{stamp[1]}\0{int(label)}".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# entries on disk
# --------------------------------------------------------------------------------------------------------------------


def _read_manifest(entry: Path) -> dict | None:
    try:
        return json.loads((entry / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _entry_is_valid(entry: Path, key: str | None = None) -> bool:
    """True when ``entry`` holds a complete cache (of ``key`` when given): manifest and arrays agree in shape."""
    manifest = _read_manifest(entry)
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        return False
    if key is not None and manifest.get("key") != key:
        return False
    try:
        n, h, w = int(manifest["num_images"]), int(manifest["height"]), int(manifest["width"])
        images = np.load(entry / _IMAGES, mmap_mode="r")
        labels = np.load(entry / _LABELS, mmap_mode="r")
        indices = np.load(entry / _INDICES, mmap_mode="r")
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (
        images.dtype == np.uint8
        and images.shape == (n, 3, h, w)
        and labels.dtype == np.int64
        and labels.shape == (n,)
        and indices.shape == (n,)
    )


# --------------------------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------------------------


class CachedImages(Dataset):
    """A read-only ``Dataset`` over a cache entry (memory-mapped ``[N, 3, H, W]`` uint8).

    * ``dataset[i]`` -> ``(uint8 tensor [3, H, W], label)``; with ``transform``, ``(transform(as_pil(i)), label)``
      instead, so the per-image PIL augmentation runs on cached pixels (a drop-in for ``ImageFolder``).
    * ``get_batch(indices)`` -> ``(uint8 [B, 3, H, W], int64 labels [B])`` in the order of ``indices`` (one sorted
      fancy-index gather from the memmap; never transformed).
    * ``load_into_memory(device)`` -> the whole ``[N, 3, H, W]`` uint8 tensor on ``device``.

    The memmap is opened lazily and not pickled, so DataLoader workers each map the file themselves.
    """

    def __init__(self, path, transform: Callable | None = None):
        self.path = Path(path)
        if not _entry_is_valid(self.path):
            raise DatasetError(f"{self.path} is not a complete image cache: rebuild it (build_image_cache)")
        manifest = _read_manifest(self.path)
        self.manifest = manifest
        self.transform = transform
        self.image_size = (int(manifest["height"]), int(manifest["width"]))
        self.classes: list[str] = list(manifest.get("classes", []))
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.skipped: list[dict] = list(manifest.get("skipped", []))
        self.labels = torch.from_numpy(np.load(self.path / _LABELS))
        self.targets: list[int] = self.labels.tolist()
        self.indices = np.load(self.path / _INDICES)
        self._images: np.ndarray | None = None

    @property
    def images(self) -> np.ndarray:
        """The read-only ``[N, 3, H, W]`` uint8 memmap."""
        if self._images is None:
            self._images = np.load(self.path / _IMAGES, mmap_mode="r")
        return self._images

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_images"] = None
        return state

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        label = self.targets[index]
        if self.transform is not None:
            return self.transform(self.as_pil(index)), label
        return torch.from_numpy(np.array(self.images[index])), label

    def as_pil(self, index: int) -> Image.Image:
        """Image ``index`` as an RGB PIL image (as decoding the file gave it)."""
        return Image.fromarray(np.ascontiguousarray(self.images[index].transpose(1, 2, 0)), "RGB")

    def get_batch(self, indices, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(uint8 [B, 3, H, W], int64 [B])`` for ``indices`` (list, array or tensor), in the given order.

        The pixels are gathered from the memmap in file order (locality when the file is not in the page cache).
        Sorted indices are fastest: they are gathered straight into the result, unsorted ones go through one
        temporary batch. The order of images within a batch does not matter to training, so sort each batch of
        the sampler (``idx.sort().values``). ``out``: an optional contiguous CPU uint8 tensor of the batch's shape
        to write into (e.g. a reused pinned buffer), avoiding a fresh allocation per batch.
        """
        idx = torch.as_tensor(indices, dtype=torch.int64).numpy().reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for an image cache of {n} images")
        idx = np.where(idx < 0, idx + n, idx)
        images = self.images
        shape = (len(idx), *images.shape[1:])
        if out is None:
            out = torch.empty(shape, dtype=torch.uint8)
        elif out.shape != shape or out.dtype != torch.uint8 or out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous CPU uint8 tensor of shape {shape}")
        out_np = out.numpy()
        if len(idx) < 2 or bool((idx[1:] >= idx[:-1]).all()):
            np.take(images, idx, axis=0, out=out_np, mode="clip")  # bounds checked above; "raise" buffers
        else:
            order = np.argsort(idx, kind="stable")
            out_np[order] = images[idx[order]]
        return out, self.labels[torch.from_numpy(idx)]

    def load_into_memory(self, device="cpu", chunk: int = 8192) -> torch.Tensor:
        """The whole cache as one uint8 tensor ``[N, 3, H, W]`` on ``device``, copied in chunks."""
        images = self.images
        out = torch.empty(images.shape, dtype=torch.uint8, device=device)
        for s in range(0, len(images), chunk):
            out[s : s + chunk].copy_(torch.from_numpy(np.array(images[s : s + chunk])))
        return out

    def __repr__(self) -> str:
        h, w = self.image_size
        return f"CachedImages({str(self.path)!r}, n={len(self)}, size={h}x{w})"
