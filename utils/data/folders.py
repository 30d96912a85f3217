"""Image datasets for tinydino: TinyImageNet download/preparation and generic folder loading.

Two parts:

* TinyImageNet-200 (``download_tiny_imagenet``): downloads the official zip, extracts it and re-lays out the
  validation split (``relayout_tiny_imagenet_val``) so that ``torchvision.datasets.ImageFolder`` can read both
  ``train/`` and ``val/`` with the same class -> label mapping.
* Generic loading (``build_image_dataset``): picks ``ImageFolder`` for class sub-folders, ``FlatImageFolder`` for a
  folder of unlabelled images, and raises ``DatasetError`` with a one-line hint for anything else.

User mistakes (missing path, empty folder, broken download, ...) raise ``DatasetError``; scripts catch it and exit
with its message instead of a traceback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from utils.runtime.errors import DatasetError

try:  # optional: nicer progress bars when tqdm happens to be installed; never a requirement
    from tqdm import tqdm as _tqdm
except ImportError:  # pragma: no cover - depends on the environment
    _tqdm = None

__all__ = [
    "DatasetError",
    "TINY_IMAGENET_URL",
    "TINY_IMAGENET_ZIP",
    "IMG_EXTENSIONS",
    "download_url",
    "make_progress",
    "download_tiny_imagenet",
    "relayout_tiny_imagenet_val",
    "FlatImageFolder",
    "build_image_dataset",
    "has_labels",
]


# --------------------------------------------------------------------------------------------------------------------
# progress reporting
# --------------------------------------------------------------------------------------------------------------------


def _format_duration(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``; ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class _TextProgress:
    """Minimal progress printer used when tqdm is not installed.

    ``unit="B"`` prints ``desc: 42.0% 100.0/238.0 MB 5.1 MB/s ETA 0:27``; any other unit prints counts
    (``desc: 42.0% 420/1000 files``). On a terminal the line is redrawn in place (``\\r``) at most every 0.2 s;
    otherwise (log files) a new line is written at most every 10 s. ``close`` always prints the final state.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "B", stream=None):
        self.total = total if total and total > 0 else None
        self.desc = desc
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.n = 0
        self.start = time.monotonic()
        self._last_print = 0.0
        isatty = getattr(self.stream, "isatty", None)
        self._tty = bool(isatty and isatty())
        self._min_interval = 0.2 if self._tty else 10.0
        self._closed = False

    def __enter__(self) -> _TextProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.n / elapsed
        parts = [f"{self.desc}:"]
        if self.total:
            parts.append(f"{100.0 * self.n / self.total:5.1f}%")
        if self.unit == "B":
            done = f"{self.n / 1e6:.1f}"
            parts.append(f"{done}/{self.total / 1e6:.1f} MB" if self.total else f"{done} MB")
            parts.append(f"{rate / 1e6:.1f} MB/s")
        else:
            parts.append(f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}")
        if self.total:
            eta = (self.total - self.n) / rate if rate > 0 else None
            parts.append(f"ETA {_format_duration(eta)}")
        return " ".join(parts)

    def _print(self, final: bool = False) -> None:
        if self._tty:
            self.stream.write("\r" + self._line() + ("\n" if final else ""))
        else:
            self.stream.write(self._line() + "\n")
        self.stream.flush()
        self._last_print = time.monotonic()

    def update(self, n: int) -> None:
        self.n += n
        if time.monotonic() - self._last_print >= self._min_interval:
            self._print()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._print(final=True)


def make_progress(total: int | None, desc: str, unit: str = "B"):
    """A progress object with ``update(n)``/``close()`` (and context-manager support): tqdm if present, else own."""
    if _tqdm is not None:
        if unit == "B":
            return _tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)
        return _tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)
    return _TextProgress(total, desc, unit=unit)


# --------------------------------------------------------------------------------------------------------------------
# TinyImageNet
# --------------------------------------------------------------------------------------------------------------------

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_ZIP = "tiny-imagenet-200.zip"  # file name of the zip, stored in the parent of the dataset root
_VAL_ANNOTATIONS = "val_annotations.txt"


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
            with open(part_path, "wb") as out, make_progress(total, f"downloading {dest_path.name}") as bar:
                while True:
                    chunk = response.read(chunk_size)
                    if not chunk:
                        break
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


def _is_extracted(root: Path) -> bool:
    """True when ``root`` holds an extracted TinyImageNet (``train/``, ``val/``, ``wnids.txt``)."""
    return (root / "train").is_dir() and (root / "val").is_dir() and (root / "wnids.txt").is_file()


def _extract_tiny_imagenet(zip_path: Path, root: Path) -> None:
    """Extract ``zip_path`` so that its ``tiny-imagenet-200/`` folder becomes ``root``.

    Extraction goes to a hidden temp folder next to ``root`` that is renamed to ``root`` at the end, so an
    interrupted extraction never leaves a half-filled ``root`` that looks prepared (the temp folder is wiped and
    redone on the next run). This also allows ``root`` to have a name other than ``tiny-imagenet-200``.
    """
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DatasetError(
            f"{root} exists but is not a complete TinyImageNet (needs train/, val/, wnids.txt): "
            f"delete it and rerun with --download"
        )
    tmp_dir = root.parent / f".{root.name}.extracting"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = zf.infolist()
            with make_progress(len(members), f"extracting {zip_path.name}", unit="files") as bar:
                for member in members:
                    zf.extract(member, tmp_dir)  # zipfile drops absolute paths and '..' components
                    bar.update(1)
    except (zipfile.BadZipFile, OSError) as exc:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise DatasetError(f"could not extract {zip_path} ({exc}): delete it and rerun with --download") from exc

    # The official zip has a single top-level 'tiny-imagenet-200/' folder; also accept a zip without it.
    if _is_extracted(tmp_dir):
        source = tmp_dir
    else:
        subdirs = [p for p in tmp_dir.iterdir() if p.is_dir() and _is_extracted(p)]
        if len(subdirs) != 1:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise DatasetError(
                f"{zip_path} does not contain TinyImageNet (no train/, val/, wnids.txt): "
                f"delete it and rerun with --download"
            )
        source = subdirs[0]
    if root.exists():
        root.rmdir()  # empty (checked above)
    os.replace(source, root)
    shutil.rmtree(tmp_dir, ignore_errors=True)


def download_tiny_imagenet(root, url: str | None = None) -> Path:
    """Make sure TinyImageNet-200 is ready at ``root`` (e.g. ``data/tiny-imagenet-200``) and return ``root``.

    Steps, each skipped when already done:

    1. download ``url`` (default: ``TINY_IMAGENET_URL``, read at call time) to ``<root parent>/tiny-imagenet-200.zip``
       unless a valid zip is already there (an invalid one is downloaded again); the zip is kept afterwards;
    2. extract it into ``root`` (``root/train/<wnid>/images/*.JPEG``, ``root/val/...``, ``wnids.txt``, ``words.txt``);
    3. re-lay out ``root/val`` into class folders (``relayout_tiny_imagenet_val``).

    When ``root`` already holds an extracted dataset nothing is downloaded or extracted; only step 3 runs (a no-op
    when already done).
    """
    root = Path(root).expanduser()
    if not _is_extracted(root):
        zip_path = root.parent / TINY_IMAGENET_ZIP
        if zip_path.is_file() and zipfile.is_zipfile(zip_path):
            print(f"using existing {zip_path}", file=sys.stderr)
        else:
            download_url(url if url is not None else TINY_IMAGENET_URL, zip_path)
        _extract_tiny_imagenet(zip_path, root)
    relayout_tiny_imagenet_val(root)
    return root


def _move(src: str, dst: str) -> None:
    """Atomic rename of one file (a module-level function so tests can simulate a crash between moves)."""
    os.replace(src, dst)


def _read_val_annotations(path: Path) -> dict[str, str]:
    """Parse ``val_annotations.txt`` (``filename<TAB>wnid<TAB>x<TAB>y<TAB>w<TAB>h`` per line) into filename -> wnid."""
    mapping: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise DatasetError(f"{path}:{lineno}: expected 'filename<TAB>wnid<TAB>...', got {line!r}")
            fname, wnid = fields[0].strip(), fields[1].strip()
            if not wnid or wnid in (".", "..") or "/" in wnid or "\\" in wnid or "/" in fname or "\\" in fname:
                raise DatasetError(f"{path}:{lineno}: bad file name or class id in {line!r}")
            mapping[fname] = wnid
    return mapping


def relayout_tiny_imagenet_val(root) -> int:
    """Move ``root/val/images/<file>`` to ``root/val/<wnid>/<file>`` per ``root/val/val_annotations.txt``.

    Afterwards ``ImageFolder(root / "val")`` reads the validation split like the train split. Returns the number of
    files moved (0 when there was nothing to do).

    Safe to re-run and to interrupt: every move is a rename, so each image is either still in ``val/images`` or
    already in its class folder; a later run moves whatever is left. ``val/images`` is removed once empty (an
    empty leftover folder would make ImageFolder fail). The annotations file is kept in ``val/`` (ImageFolder
    ignores plain files at the top level). Files in ``val/images`` that the annotations do not list raise
    ``DatasetError`` before anything is moved; after moving, every annotated image is checked to be in place.
    """
    val_dir = Path(root).expanduser() / "val"
    images_dir = val_dir / "images"
    ann_path = val_dir / _VAL_ANNOTATIONS
    if not images_dir.is_dir():
        return 0  # already re-laid out (or nothing to re-lay out)

    pending = sorted(e.name for e in os.scandir(images_dir))
    if not pending:
        images_dir.rmdir()  # crashed after the last move but before removing the folder
        return 0
    if not ann_path.is_file():
        raise DatasetError(
            f"{ann_path} is missing but {images_dir} still has images: restore val_annotations.txt "
            f"(re-extract the TinyImageNet zip or rerun with --download after deleting {Path(root)})"
        )
    mapping = _read_val_annotations(ann_path)
    unknown = [name for name in pending if name not in mapping]
    if unknown:
        raise DatasetError(
            f"{len(unknown)} file(s) in {images_dir} are not listed in {ann_path} (e.g. {unknown[0]}): "
            f"remove them or restore the original annotations file"
        )

    moved = 0
    made: set[str] = set()
    try:
        for name in pending:
            class_dir = val_dir / mapping[name]
            if mapping[name] not in made:
                class_dir.mkdir(exist_ok=True)
                made.add(mapping[name])
            _move(str(images_dir / name), str(class_dir / name))
            moved += 1
        images_dir.rmdir()
    except OSError as exc:
        raise DatasetError(
            f"could not re-lay out {val_dir} ({exc}): make the dataset folder writable (or copy it somewhere "
            f"writable) and rerun; already moved images stay in place"
        ) from exc

    missing = [name for name, wnid in mapping.items() if not (val_dir / wnid / name).is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} val image(s) listed in {ann_path} are missing (e.g. {missing[0]}): "
            f"delete {Path(root)} and rerun with --download"
        )
    return moved


# --------------------------------------------------------------------------------------------------------------------
# generic loading
# --------------------------------------------------------------------------------------------------------------------

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
        is_tiny_val = (split_dir / _VAL_ANNOTATIONS).is_file() or (path / "wnids.txt").is_file()
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
