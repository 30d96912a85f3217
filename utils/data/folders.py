"""Image folders as datasets: ``ImageFolder`` for class sub-folders, ``FlatImageFolder`` for unlabelled images.

:func:`build_image_dataset` picks the reader for a ``--data_path`` and a split (``train``/``val``), and raises
``DatasetError`` with a one-line hint for anything else. Hidden files and folders (names starting with ``.``) are
never read: a folder such as ``.ipynb_checkpoints`` or an old ``.tinydino_cache`` is not a class.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from utils.data.tinyimagenet import VAL_ANNOTATIONS, relayout_tiny_imagenet_val
from utils.runtime.errors import DatasetError

__all__ = [
    "IMG_EXTENSIONS",
    "FlatImageFolder",
    "build_image_dataset",
    "has_labels",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _is_image_file(path) -> bool:
    """True for a file name with an image extension (case-insensitive) that is not hidden (e.g. macOS ``._x.jpg``)."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _pil_loader(path: str) -> Image.Image:
    """Open an image file as RGB."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def _has_direct_images(folder: Path) -> bool:
    """True when ``folder`` itself (not its sub-folders) contains an image file."""
    with os.scandir(folder) as it:
        return any(e.is_file() and _is_image_file(e.name) for e in it)


def _has_images_below(folder: Path) -> bool:
    """True when ``folder`` or any folder below it contains an image file (stops at the first one found)."""
    return any(any(_is_image_file(f) for f in fnames) for _, _, fnames in os.walk(folder, followlinks=True))


def _class_dirs(folder: Path) -> list[str]:
    """Non-hidden sub-folders of ``folder`` (candidate class folders), sorted."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _has_class_dirs_with_images(folder: Path) -> bool:
    """True when some non-hidden sub-folder of ``folder`` contains images (at any depth, as ImageFolder reads)."""
    return any(_has_images_below(folder / name) for name in _class_dirs(folder))


class _ImageFolder(ImageFolder):
    """``torchvision.datasets.ImageFolder`` that ignores hidden folders (``.ipynb_checkpoints``, ...) and files."""

    def find_classes(self, directory):
        classes = _class_dirs(Path(directory))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: i for i, name in enumerate(classes)}


def _image_folder(folder: Path, transform: Callable | None) -> ImageFolder:
    """``ImageFolder(folder)`` with our extension rule; an empty class folder becomes a ``DatasetError``."""
    try:
        return _ImageFolder(str(folder), transform=transform, loader=_pil_loader, is_valid_file=_is_image_file)
    except FileNotFoundError as exc:
        raise DatasetError(f"{folder}: {exc} Remove empty class folders or add images to them.") from exc


class FlatImageFolder(Dataset):
    """A folder of unlabelled images without class sub-folders.

    Only image files directly inside ``root`` are used (not recursive: sub-folders with images would be classes,
    which is ``ImageFolder``'s job); hidden files are skipped. Files are sorted by name. Items are
    ``(transform(image), -1)``; ``samples`` is a list of ``(path, -1)``, ``targets`` a list of ``-1``, ``classes``
    and ``class_to_idx`` are empty. Raises ``DatasetError`` when ``root`` has no images.
    """

    def __init__(self, root, transform: Callable | None = None, loader: Callable[[str], object] = _pil_loader):
        self.root = str(Path(root).expanduser())
        self.transform = transform
        self.loader = loader
        with os.scandir(self.root) as it:
            files = sorted(e.name for e in it if e.is_file() and _is_image_file(e.name))
        if not files:
            raise DatasetError(f"no images in {self.root} (looked for {', '.join(IMG_EXTENSIONS)})")
        self.samples = [(os.path.join(self.root, name), -1) for name in files]
        self.imgs = self.samples
        self.targets = [-1] * len(self.samples)
        self.classes: list[str] = []
        self.class_to_idx: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        image = self.loader(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, target

    def __repr__(self) -> str:
        return f"FlatImageFolder(root={self.root!r}, n={len(self)})"


def _folder_dataset(folder: Path, transform: Callable | None) -> Dataset:
    """ImageFolder when ``folder`` has class sub-folders with images, else FlatImageFolder, else DatasetError."""
    if _has_class_dirs_with_images(folder):
        return _image_folder(folder, transform)
    if _has_direct_images(folder):
        return FlatImageFolder(folder, transform=transform)
    raise DatasetError(f"no images in {folder} (looked for {', '.join(IMG_EXTENSIONS)}, also in sub-folders)")


def build_image_dataset(data_path, split: str = "train", transform: Callable | None = None) -> Dataset | None:
    """Build the dataset for ``split`` from ``data_path``.

    Resolution order:

    1. ``data_path/split`` exists -> ``ImageFolder`` on it if it has class sub-folders with images, else
       ``FlatImageFolder`` if it has images directly, else ``DatasetError``. A TinyImageNet ``val`` folder that is
       not re-laid out yet (``val/images`` next to ``val_annotations.txt`` or ``wnids.txt``) is re-laid out first
       (on disk, idempotent; a missing annotations file raises ``DatasetError``).
    2. ``split == "train"`` and ``data_path`` has class sub-folders with images -> ``ImageFolder(data_path)``
       (loose images directly in ``data_path`` are then ignored).
    3. ``split == "train"`` and ``data_path`` has images directly -> ``FlatImageFolder(data_path)``.
    4. any other split without its folder -> ``None``: there is no such split and the caller decides what to do
       (e.g. skip the online k-NN evaluation when there is no ``val``).
    5. otherwise ``DatasetError`` (missing path, or no images anywhere).

    ImageFolder here skips hidden folders/files and uses ``IMG_EXTENSIONS`` (case-insensitive).
    """
    path = Path(data_path).expanduser()
    if not path.exists():
        raise DatasetError(
            f"no dataset at {path}: pass --download to fetch TinyImageNet, "
            "or --dataset synthetic to use the embedded data"
        )
    if not path.is_dir():
        raise DatasetError(f"{path} is not a folder: pass the folder that holds the images (or train/ and val/)")

    split_dir = path / split
    if split_dir.is_dir():
        is_tiny_val = (split_dir / VAL_ANNOTATIONS).is_file() or (path / "wnids.txt").is_file()
        if split == "val" and (split_dir / "images").is_dir() and is_tiny_val:
            print(f"re-laying out TinyImageNet {split_dir} into class folders", file=sys.stderr)
            relayout_tiny_imagenet_val(path)
        return _folder_dataset(split_dir, transform)
    if split != "train":
        return None
    if (path / "val").is_dir() and _has_class_dirs_with_images(path):
        raise DatasetError(f"{path} has a val/ folder but no train/ folder: add {path / 'train'} or pass another path")
    return _folder_dataset(path, transform)


def has_labels(dataset) -> bool:
    """True when ``dataset`` carries real labels: an ImageFolder-like dataset with at least 2 classes.

    False for ``FlatImageFolder`` (no classes), ``None`` and datasets without a ``classes`` attribute. A
    ``torch.utils.data.Subset`` is looked through.
    """
    while dataset is not None and not hasattr(dataset, "classes") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    classes = getattr(dataset, "classes", None)
    return classes is not None and len(classes) >= 2
