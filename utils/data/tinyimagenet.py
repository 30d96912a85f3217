"""TinyImageNet in the release's format: find or download the zip, extract it, re-lay out the validation split.

After :func:`download_tiny_imagenet` (or :func:`relayout_tiny_imagenet_val` on an extracted copy),
``torchvision.datasets.ImageFolder`` reads ``root/train`` and ``root/val`` with the same class -> label mapping. The
same code prepares a subset of the release in its format (e.g. ``tiny-imagenet-10.zip``). User mistakes (broken
zip, missing annotations, a half-filled folder) raise ``DatasetError`` with a one-line hint.
"""

from __future__ import annotations

import os
import shutil
import sys
import urllib.parse
import zipfile
from pathlib import Path

from utils.data.download import download_url, progress_bar
from utils.runtime.errors import DatasetError

__all__ = [
    "TINY_IMAGENET_URL",
    "TINY_IMAGENET_ZIP",
    "VAL_ANNOTATIONS",
    "download_tiny_imagenet",
    "relayout_tiny_imagenet_val",
]

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_ZIP = "tiny-imagenet-200.zip"  # the release's zip name: where a download of the official URL goes
VAL_ANNOTATIONS = "val_annotations.txt"  # in val/: file<TAB>wnid<TAB>box per line


def _is_extracted(root: Path) -> bool:
    """True when ``root`` holds an extracted TinyImageNet (``train/``, ``val/``, ``wnids.txt``)."""
    return (root / "train").is_dir() and (root / "val").is_dir() and (root / "wnids.txt").is_file()


def _extract_tiny_imagenet(zip_path: Path, root: Path) -> None:
    """Extract ``zip_path`` so that its top folder (``tiny-imagenet-200/`` in the release) becomes ``root``.

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
            with progress_bar(len(members), f"extracting {zip_path.name}", unit="files") as bar:
                for member in members:
                    zf.extract(member, tmp_dir)  # zipfile drops absolute paths and '..' components
                    bar.update(1)
    except (zipfile.BadZipFile, OSError) as exc:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise DatasetError(f"could not extract {zip_path} ({exc}): delete it and rerun with --download") from exc

    # The release's zip has a single top-level folder ('tiny-imagenet-200/'); also accept a zip without one.
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


def _zip_for(root: Path, url: str) -> tuple[Path, Path]:
    """``(<root parent>/<root name>.zip, <root parent>/<file name of url>)``: where a zip for ``root`` is looked for."""
    release_name = Path(urllib.parse.urlparse(url).path).name or TINY_IMAGENET_ZIP
    return root.parent / f"{root.name}.zip", root.parent / release_name


def download_tiny_imagenet(root, url: str | None = None) -> Path:
    """Make sure a TinyImageNet-format dataset is ready at ``root`` (e.g. ``data/tiny-imagenet-200``); return ``root``.

    Steps, each skipped when already done:

    1. find the zip in ``root``'s parent folder: ``<root name>.zip`` (e.g. ``tiny-imagenet-10.zip`` for
       ``data/tiny-imagenet-10``, a subset of the release in the release's format), else the file name of ``url``
       (default ``TINY_IMAGENET_URL``, read at call time: ``tiny-imagenet-200.zip``); a file there that is not a
       valid zip does not count. Without one, download ``url`` to ``<root parent>/<file name of url>``. The zip is
       kept afterwards;
    2. extract it into ``root`` (``root/train/<wnid>/images/*.JPEG``, ``root/val/...``, ``wnids.txt``, ``words.txt``);
    3. re-lay out ``root/val`` into class folders (``relayout_tiny_imagenet_val``).

    When ``root`` already holds an extracted dataset nothing is downloaded or extracted; only step 3 runs (a no-op
    when already done).
    """
    root = Path(root).expanduser()
    if not _is_extracted(root):
        url = url if url is not None else TINY_IMAGENET_URL
        own_zip, release_zip = _zip_for(root, url)
        found = [p for p in dict.fromkeys((own_zip, release_zip)) if p.is_file() and zipfile.is_zipfile(p)]
        if found:
            zip_path = found[0]
            print(f"using existing {zip_path}", file=sys.stderr)
        else:
            zip_path = download_url(url, release_zip)
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
    ann_path = val_dir / VAL_ANNOTATIONS
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
