"""STL-10 in its official binary format: reading (memory-mapped), downloading, and writing (for tests).

Layout of the official archive (``stl10_binary.tar.gz``, extracted under ``<root>``)::

    <root>/stl10_binary/train_X.bin      5000 images   (N x 27648 bytes, no header)
    <root>/stl10_binary/train_y.bin      5000 labels   (one byte each, 1..10)
    <root>/stl10_binary/test_X.bin       8000 images
    <root>/stl10_binary/test_y.bin       8000 labels
    <root>/stl10_binary/class_names.txt  one class name per line (airplane, bird, ...)
    <root>/stl10_binary/unlabeled_X.bin, fold_indices.txt  (not used here)

Each image is 3 x 96 x 96 uint8 bytes stored **column-major per channel**: all red bytes first, then green, then
blue, and within a channel column after column (byte ``c*9216 + x*96 + y`` is channel ``c`` of the pixel in row
``y``, column ``x``). A plain ``reshape(3, 96, 96)`` therefore gives transposed images; :class:`STL10Binary` swaps
the axes back. Labels on disk are 1..10; the dataset returns 0..9.

torchvision's ``STL10`` checks the archive's MD5 sum, so it cannot read generated miniature files; we read the format
ourselves, and :func:`write_stl10_binary` writes it (the exact inverse of the reader, used by the tests).
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from utils.data.augment.per_image import normalize, to_rgb
from utils.data.download import download_url, progress_bar
from utils.runtime.errors import DatasetError

__all__ = [
    "STL10_URL",
    "STL10_ARCHIVE",
    "STL10_FOLDER",
    "STL10_CLASSES",
    "IMAGE_SIZE",
    "SPLITS",
    "STL10Binary",
    "stl10_folder",
    "is_stl10_ready",
    "download_stl10",
    "write_stl10_binary",
    "stl10_transform",
]

STL10_URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
STL10_ARCHIVE = "stl10_binary.tar.gz"  # stored in <root> and kept after extraction
STL10_FOLDER = "stl10_binary"
#: The official class names, in label order (what ``class_names.txt`` holds).
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
IMAGE_SIZE = 96
_CHANNELS = 3
_IMAGE_BYTES = _CHANNELS * IMAGE_SIZE * IMAGE_SIZE  # 27648
SPLITS = ("train", "test")
_CLASS_NAMES = "class_names.txt"


def _split_files(folder: Path, split: str) -> tuple[Path, Path]:
    return folder / f"{split}_X.bin", folder / f"{split}_y.bin"


def _required_files(folder: Path) -> list[Path]:
    files = [folder / _CLASS_NAMES]
    for split in SPLITS:
        files.extend(_split_files(folder, split))
    return files


def stl10_folder(root) -> Path:
    """The folder holding the ``*.bin`` files: ``<root>/stl10_binary``, or ``root`` itself if the files are there."""
    root = Path(root).expanduser()
    if not (root / STL10_FOLDER).is_dir() and (root / "train_X.bin").is_file():
        return root
    return root / STL10_FOLDER


def is_stl10_ready(root) -> bool:
    """True when the train/test images and labels and ``class_names.txt`` are all in place."""
    return all(p.is_file() for p in _required_files(stl10_folder(root)))


def _read_class_names(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise DatasetError(f"{path} lists no class names: delete the dataset folder and rerun with --download")
    return names


class STL10Binary(Dataset):
    """One split (``"train"`` or ``"test"``) of STL-10 read from the official binary files.

    Items are ``(image, label)``: ``image`` is a 96x96 RGB ``PIL.Image`` (upright), or ``transform(image)`` when a
    transform is given; ``label`` is an ``int`` in ``[0, len(classes))``. Images are read from a ``np.memmap`` of
    ``<split>_X.bin``, so only the images asked for are read from disk; the memory map is opened lazily in each
    process (data-loader workers, spawned or forked, reopen it instead of receiving a copy of the data). Labels
    (one byte per image) are read at once and are available as :attr:`targets`.

    Raises :class:`DatasetError` (one line) when files are missing (naming ``--download``), truncated, or hold
    labels outside ``1..len(classes)``.
    """

    def __init__(self, root, split: str = "train", transform: Callable | None = None):
        if split not in SPLITS:
            raise DatasetError(f"unknown STL-10 split {split!r}: use {' or '.join(SPLITS)}")
        self.root = Path(root).expanduser()
        self.split = split
        self.transform = transform
        folder = stl10_folder(self.root)
        missing = [p.name for p in _required_files(folder) if not p.is_file()]
        if missing:
            if (self.root / STL10_ARCHIVE).is_file():
                hint = f"pass --download to extract {self.root / STL10_ARCHIVE}"
            else:
                hint = f"pass --download to fetch it ({STL10_URL}, 2.5 GB)"
            raise DatasetError(
                f"STL-10 not found in {folder} (missing {', '.join(missing)}): {hint}, or point --data_path at the "
                f"folder that holds {STL10_FOLDER}/"
            )
        self.images_path, labels_path = _split_files(folder, split)
        self.classes = _read_class_names(folder / _CLASS_NAMES)
        raw = np.fromfile(labels_path, dtype=np.uint8)
        count = raw.shape[0]
        size = self.images_path.stat().st_size
        if size != count * _IMAGE_BYTES:
            raise DatasetError(
                f"{self.images_path} has {size} bytes but {labels_path.name} lists {count} images of {_IMAGE_BYTES} "
                f"bytes ({count * _IMAGE_BYTES} bytes): the files are truncated or mismatched; delete {folder} and "
                "rerun with --download"
            )
        if count and (int(raw.min()) < 1 or int(raw.max()) > len(self.classes)):
            raise DatasetError(
                f"{labels_path} holds labels outside 1..{len(self.classes)} (found {int(raw.min())}..{int(raw.max())}):"
                f" it is not an STL-10 label file; delete {folder} and rerun with --download"
            )
        self.targets: list[int] = (raw.astype(np.int64) - 1).tolist()
        self._images: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def _memmap(self) -> np.memmap:
        if self._images is None:
            shape = (len(self.targets), _CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
            self._images = np.memmap(self.images_path, dtype=np.uint8, mode="r", shape=shape)
        return self._images

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_images"] = None  # never pickle the mapped data (spawned workers would receive all of it)
        return state

    def image_array(self, index: int) -> np.ndarray:
        """Image ``index`` as an upright ``[96, 96, 3]`` uint8 array (rows, columns, RGB)."""
        stored = self._memmap()[index]  # [channel, column, row]
        return np.ascontiguousarray(stored.transpose(2, 1, 0))

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image = Image.fromarray(self.image_array(index))
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def __repr__(self) -> str:
        return f"STL10Binary(split={self.split!r}, {len(self)} images, {len(self.classes)} classes, root={self.root})"


def write_stl10_binary(
    root, split: str, images: np.ndarray, labels: Sequence[int], class_names: Sequence[str] = STL10_CLASSES
) -> Path:
    """Write ``images`` and ``labels`` as ``<root>/stl10_binary/<split>_{X,y}.bin`` (and ``class_names.txt``).

    The exact inverse of :class:`STL10Binary`, for tests and for building small STL-10-format datasets:
    ``images`` is ``[N, 96, 96, 3]`` uint8 (rows, columns, RGB), ``labels`` are 0-based (written as 1..C).
    Existing files of the split are overwritten. Returns the ``stl10_binary`` folder.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, _CHANNELS):
        raise ValueError(f"images must be uint8 [N, 96, 96, 3], got {images.dtype} {list(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"labels must lie in [0, {len(class_names)})")
    folder = Path(root).expanduser() / STL10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    images_path, labels_path = _split_files(folder, split)
    images_path.write_bytes(np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes())  # [N, channel, col, row]
    labels_path.write_bytes((labels + 1).astype(np.uint8).tobytes())
    (folder / _CLASS_NAMES).write_text("".join(f"{name}\n" for name in class_names), encoding="utf-8")
    return folder


def stl10_transform(resize: int = 256, crop: int = 224) -> transforms.Compose:
    """The evaluation transform of the original STL-10 notebook: Resize ``resize`` (bicubic, shorter side),
    CenterCrop ``crop``, ImageNet normalisation → ``[3, crop, crop]`` float tensors."""
    return transforms.Compose(
        [
            transforms.Lambda(to_rgb),
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(crop),
            normalize(),
        ]
    )


# --------------------------------------------------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------------------------------------------------


class _CountingReader:
    """A read-only file wrapper that reports every byte read to a progress bar (extraction progress of a .tar.gz,
    counted in compressed bytes so that the total, the archive's size, is known up front)."""

    def __init__(self, f, bar):
        self.f, self.bar = f, bar

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.bar.update(len(data))
        return data


def _safe_member_path(name: str) -> PurePosixPath | None:
    """The relative path of an archive member, or None when it would escape the target folder."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return path


def _extract_archive(archive: Path, root: Path) -> None:
    """Extract the regular files and folders of ``archive`` into ``root`` through a temporary folder.

    The ``stl10_binary/`` folder appears in ``root`` only once complete (one rename), so an interrupted extraction
    never leaves files that look ready. Links, devices and paths escaping the folder are skipped.
    """
    tmp_dir = root / f".{STL10_FOLDER}.extracting"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    try:
        with (
            open(archive, "rb") as raw,
            progress_bar(archive.stat().st_size, f"extracting {archive.name}") as bar,
            tarfile.open(fileobj=_CountingReader(raw, bar), mode="r|gz") as tar,
        ):
            for member in tar:
                rel = _safe_member_path(member.name)
                if rel is None or not (member.isfile() or member.isdir()):
                    continue
                target = tmp_dir.joinpath(*rel.parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                with source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
    except (tarfile.TarError, OSError, EOFError) as exc:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise DatasetError(f"could not extract {archive} ({exc}): delete it and rerun with --download") from exc
    source_dir = tmp_dir / STL10_FOLDER
    if not all(p.is_file() for p in _required_files(source_dir)):
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise DatasetError(
            f"{archive} does not contain STL-10's {STL10_FOLDER}/ train/test files: delete it and rerun with --download"
        )
    target_dir = root / STL10_FOLDER
    if target_dir.exists():
        shutil.rmtree(target_dir)  # an incomplete leftover (is_stl10_ready was False)
    os.replace(source_dir, target_dir)
    shutil.rmtree(tmp_dir, ignore_errors=True)


def download_stl10(root, url: str | None = None) -> Path:
    """Make sure STL-10 is ready under ``root`` (``<root>/stl10_binary/...``) and return ``root``.

    Downloads ``url`` (default :data:`STL10_URL`, 2.5 GB) to ``<root>/stl10_binary.tar.gz`` with a progress bar
    unless a readable archive is already there (the archive is kept), then extracts it with a progress count.
    Nothing happens when the files are already in place. Failures raise :class:`DatasetError`.
    """
    root = Path(root).expanduser()
    if is_stl10_ready(root):
        return root
    root.mkdir(parents=True, exist_ok=True)
    archive = root / STL10_ARCHIVE
    if archive.is_file() and tarfile.is_tarfile(archive):
        print(f"using existing {archive}", file=sys.stderr)
    else:
        download_url(url if url is not None else STL10_URL, archive)
    _extract_archive(archive, root)
    return root
