"""Image folders as datasets (utils/data/folders.py): ImageFolder roots, split folders, flat folders, user mistakes."""

import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from utils.data import folders
from utils.data.folders import FlatImageFolder, build_image_dataset, has_labels
from utils.runtime.errors import DatasetError

# ------------------------------------------------------------------------------------------------------------------
# build_image_dataset
# ------------------------------------------------------------------------------------------------------------------


def _write_image(path: Path, seed: int = 0, size=(10, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (seed % 256, 20, 30)).save(path)


def test_build_plain_imagefolder_root(tmp_path):
    root = tmp_path / "pets"
    for c, cls in enumerate(["cat", "dog"]):
        for i in range(2):
            _write_image(root / cls / f"{i}.png", seed=10 * c + i)
    _write_image(root / "dog" / "nested" / "deep.JPG")  # ImageFolder walks sub-folders, extension case-insensitive
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "._0.png").write_bytes(b"macOS resource fork")  # hidden: skipped
    (root / ".ipynb_checkpoints").mkdir()  # hidden folder: not a class
    _write_image(root / "loose.png")  # loose top-level image: ignored by ImageFolder
    transform_calls = []

    def transform(img):
        transform_calls.append(img.size)
        return torch.zeros(3)

    ds = build_image_dataset(root, transform=transform)
    assert isinstance(ds, ImageFolder) and ds.classes == ["cat", "dog"]
    assert [(Path(p).relative_to(root).as_posix(), t) for p, t in ds.samples] == [
        ("cat/0.png", 0),
        ("cat/1.png", 0),
        ("dog/0.png", 1),
        ("dog/1.png", 1),
        ("dog/nested/deep.JPG", 1),
    ]
    x, y = ds[4]
    assert torch.equal(x, torch.zeros(3)) and y == 1 and transform_calls == [(10, 6)]
    assert has_labels(ds)
    assert has_labels(torch.utils.data.Subset(ds, [0, 1]))
    assert build_image_dataset(root, "val") is None  # no val split: caller skips k-NN


def test_build_split_folder_with_flat_images(tmp_path):
    root = tmp_path / "d"
    _write_image(root / "train" / "b.jpg")
    _write_image(root / "train" / "a.jpeg")
    ds = build_image_dataset(root, "train")
    assert isinstance(ds, FlatImageFolder)
    assert [Path(p).name for p, _ in ds.samples] == ["a.jpeg", "b.jpg"]


def test_build_flat_folder_of_unlabelled_images(tmp_path):
    root = tmp_path / "flat"
    for i in (2, 0, 1):
        _write_image(root / f"img_{i}.png", seed=i, size=(5 + i, 4))
    (root / "readme.txt").write_text("x")
    (root / "empty_subfolder").mkdir()
    ds = build_image_dataset(root, transform=lambda im: im.size)
    assert isinstance(ds, FlatImageFolder)
    assert len(ds) == 3 and ds.classes == [] and ds.class_to_idx == {}
    assert ds.samples == [(str(root / f"img_{i}.png"), -1) for i in range(3)]
    assert ds.targets == [-1, -1, -1]
    assert ds[2] == ((7, 4), -1)
    assert not has_labels(ds)
    assert build_image_dataset(root, "val") is None
    raw = FlatImageFolder(root)
    image, target = raw[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and target == -1


def test_build_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError) as info:
        build_image_dataset(missing)
    msg = str(info.value)
    assert str(missing) in msg and "--download" in msg and "--dataset synthetic" in msg and "\n" not in msg
    with pytest.raises(DatasetError, match="--download"):
        build_image_dataset(missing, "val")


def test_build_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="no images in"):
        build_image_dataset(empty)
    (empty / "train").mkdir()
    with pytest.raises(DatasetError, match="no images in .*train"):
        build_image_dataset(empty, "train")
    with pytest.raises(DatasetError, match="no images"):
        FlatImageFolder(empty)


def test_build_empty_class_folder_is_a_dataset_error(tmp_path):
    root = tmp_path / "d"
    _write_image(root / "cat" / "0.png")
    (root / "dog").mkdir()
    with pytest.raises(DatasetError, match="dog"):
        build_image_dataset(root)


def test_build_val_without_train_is_an_error(tmp_path):
    root = tmp_path / "d"
    _write_image(root / "val" / "cat" / "0.png")
    with pytest.raises(DatasetError, match="no train/"):
        build_image_dataset(root, "train")
    assert len(build_image_dataset(root, "val")) == 1


def test_build_path_is_a_file(tmp_path):
    f = tmp_path / "x.png"
    _write_image(f)
    with pytest.raises(DatasetError, match="not a folder"):
        build_image_dataset(f)


def test_has_labels_edge_cases(tmp_path):
    root = tmp_path / "one"
    _write_image(root / "only" / "0.png")
    assert not has_labels(build_image_dataset(root))  # a single class is no label information
    assert not has_labels(None)
    assert not has_labels(torch.utils.data.TensorDataset(torch.zeros(2)))


def test_image_extensions():
    assert ".jpeg" in folders.IMG_EXTENSIONS and ".png" in folders.IMG_EXTENSIONS
    assert folders._is_image_file("a/b/X.JPEG") and not folders._is_image_file("a/b/boxes.txt")
    assert not folders._is_image_file(os.path.join("d", ".hidden.jpg"))
