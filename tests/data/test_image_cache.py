"""The decoded-image cache: same pixels as decoding, keyed by the file list, atomic, skips corrupt files."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data import image_cache_build
from utils.data.folders import build_image_dataset
from utils.data.image_cache import CachedImages, cache_key
from utils.data.image_cache_build import build_image_cache, cached_image_dataset
from utils.data.synthetic import generate_synthetic_dataset
from utils.runtime.errors import DatasetError


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    """10 classes x 3 train / 1 val images, 64x64 JPEGs (never modified: tests that change files copy it)."""
    return generate_synthetic_dataset(tmp_path_factory.mktemp("cache_data"), train_per_class=3, val_per_class=1)


@pytest.fixture
def data_copy(synthetic_root, tmp_path) -> Path:
    """A private copy of the synthetic dataset that a test may change."""
    return Path(shutil.copytree(synthetic_root, tmp_path / "data"))


@pytest.fixture
def decode_counter(monkeypatch):
    """Counts the images the cache decodes (in-process builds only: ``num_workers=0``)."""
    calls = {"n": 0}
    real = image_cache_build._decode_image

    def counting(path, size):
        calls["n"] += 1
        return real(path, size)

    monkeypatch.setattr(image_cache_build, "_decode_image", counting)
    return calls


def decode(path) -> np.ndarray:
    """Reference decoding: PIL -> RGB -> numpy, as CHW."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).transpose(2, 0, 1)


def entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir()) if cache_dir.exists() else []


def build(root: Path, cache_dir: Path, **kwargs) -> CachedImages:
    dataset = build_image_dataset(root, "train")
    kwargs.setdefault("num_workers", 0)
    return cached_image_dataset(dataset, cache_dir, name="train", verbose=False, **kwargs)


def test_pixels_and_labels_equal_decoding_the_files(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setattr(image_cache_build, "_CHUNK", 4)  # several chunks, so the 2 worker processes really run
    dataset = build_image_dataset(synthetic_root, "train")
    cached = cached_image_dataset(dataset, tmp_path / "cache", name="train", num_workers=2, verbose=False)

    assert len(cached) == len(dataset.samples) == 30
    assert cached.image_size == (64, 64)
    assert cached.classes == dataset.classes
    assert cached.targets == [label for _, label in dataset.samples]
    assert cached.labels.dtype == torch.int64
    assert cached.indices.tolist() == list(range(30))
    assert cached.images.shape == (30, 3, 64, 64) and cached.images.dtype == np.uint8
    for i, (path, label) in enumerate(dataset.samples):
        image, cached_label = cached[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
        np.testing.assert_array_equal(image.numpy(), decode(path), err_msg=path)
        assert cached_label == label
        assert np.array_equal(np.asarray(cached.as_pil(i)), decode(path).transpose(1, 2, 0))


def test_get_batch_equals_stacking_getitem(synthetic_root, tmp_path):
    cached = build(synthetic_root, tmp_path / "cache")
    indices = [17, 3, 3, 29, 0, -1, 12, 5]  # unsorted, a duplicate and a negative index
    images, labels = cached.get_batch(indices)
    items = [cached[i] for i in indices]
    assert images.dtype == torch.uint8 and images.shape == (len(indices), 3, 64, 64)
    assert torch.equal(images, torch.stack([image for image, _ in items]))
    assert labels.dtype == torch.int64 and labels.tolist() == [label for _, label in items]
    images_t, labels_t = cached.get_batch(torch.tensor(indices))
    assert torch.equal(images_t, images) and torch.equal(labels_t, labels)
    ordered = sorted(i % len(cached) for i in indices)  # the fast path: sorted indices, straight into `out`
    buffer = torch.empty(len(indices), 3, 64, 64, dtype=torch.uint8)
    images_s, labels_s = cached.get_batch(ordered, out=buffer)
    assert images_s is buffer
    assert torch.equal(images_s, torch.stack([cached[i][0] for i in ordered]))
    assert labels_s.tolist() == [cached.targets[i] for i in ordered]
    with pytest.raises(ValueError):
        cached.get_batch(ordered, out=buffer[:2])
    assert cached.get_batch([])[0].shape == (0, 3, 64, 64)
    with pytest.raises(IndexError):
        cached.get_batch([len(cached)])
    assert torch.equal(cached.load_into_memory("cpu"), torch.from_numpy(np.array(cached.images)))


def test_no_rebuild_when_nothing_changed(synthetic_root, tmp_path, decode_counter):
    first = build(synthetic_root, tmp_path / "cache")
    assert decode_counter["n"] == 30
    mtime = (first.path / "images.npy").stat().st_mtime_ns
    second = build(synthetic_root, tmp_path / "cache")
    assert decode_counter["n"] == 30, "an unchanged dataset must not be decoded again"
    assert second.path == first.path
    assert (second.path / "images.npy").stat().st_mtime_ns == mtime
    assert entries(tmp_path / "cache") == [first.path]


def _add(root: Path) -> None:
    src = next((root / "train").glob("*/*.JPEG"))
    shutil.copy(src, src.with_name("added.JPEG"))


def _remove(root: Path) -> None:
    sorted((root / "train").glob("*/*.JPEG"))[4].unlink()


def _modify(root: Path) -> None:
    files = sorted((root / "train").glob("*/*.JPEG"))
    files[0].write_bytes(files[-1].read_bytes())  # other pixels in the same place


def _touch(root: Path) -> None:
    path = sorted((root / "train").glob("*/*.JPEG"))[7]
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


@pytest.mark.parametrize("change", [_add, _remove, _modify, _touch], ids=["add", "remove", "modify", "touch"])
def test_rebuilds_when_the_file_list_changes(data_copy, tmp_path, decode_counter, change):
    cache_dir = tmp_path / "cache"
    old = build(data_copy, cache_dir)
    old_key = cache_key(build_image_dataset(data_copy, "train").samples)
    change(data_copy)
    dataset = build_image_dataset(data_copy, "train")
    assert cache_key(dataset.samples) != old_key
    decode_counter["n"] = 0
    new = build(data_copy, cache_dir)
    assert decode_counter["n"] == len(dataset.samples), "the changed dataset must be decoded again"
    assert new.path != old.path
    assert entries(cache_dir) == [new.path], "the stale entry of the same name is removed"
    assert new.targets == [label for _, label in dataset.samples]
    for i, (path, _) in enumerate(dataset.samples):
        np.testing.assert_array_equal(new.images[i], decode(path), err_msg=path)


def test_interrupted_build_leaves_no_valid_cache(data_copy, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    real = image_cache_build._decode_image
    calls = {"n": 0}

    def crash_midway(path, size):
        calls["n"] += 1
        if calls["n"] == 12:
            raise RuntimeError("simulated crash")
        return real(path, size)

    monkeypatch.setattr(image_cache_build, "_decode_image", crash_midway)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(data_copy, cache_dir)
    assert entries(cache_dir) == [], "an interrupted build leaves nothing behind"

    # A build killed hard (no cleanup) leaves its .building-* folder: it is never taken for a cache and is removed
    # by the next build once its process is gone.
    monkeypatch.setattr(image_cache_build.shutil, "rmtree", lambda *a, **k: None)
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(data_copy, cache_dir)
    monkeypatch.undo()
    (leftover,) = entries(cache_dir)
    assert leftover.name.startswith(".building-train-")
    with pytest.raises(DatasetError):
        CachedImages(leftover)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = json.loads((leftover / "owner.json").read_text())
    (leftover / "owner.json").write_text(json.dumps({**owner, "pid": int(dead.stdout)}))

    cached = build(data_copy, cache_dir)
    assert len(cached) == 30
    assert entries(cache_dir) == [cached.path], "the dead build's folder is cleaned up"


def test_damaged_entry_is_rebuilt(synthetic_root, tmp_path, decode_counter):
    cached = build(synthetic_root, tmp_path / "cache")
    images = cached.path / "images.npy"
    del cached
    with open(images, "r+b") as f:  # e.g. a disk that filled up while someone copied the cache
        f.truncate(images.stat().st_size - 100)
    with pytest.raises(DatasetError):
        CachedImages(images.parent)
    decode_counter["n"] = 0
    rebuilt = build(synthetic_root, tmp_path / "cache")
    assert decode_counter["n"] == 30 and len(rebuilt) == 30


def test_corrupt_images_are_skipped_and_counted(data_copy, tmp_path):
    dataset = build_image_dataset(data_copy, "train")
    paths = [p for p, _ in dataset.samples]
    Path(paths[2]).write_bytes(b"this is not a jpeg")
    data = Path(paths[9]).read_bytes()
    Path(paths[9]).write_bytes(data[: len(data) // 2])  # truncated
    Path(paths[20]).write_bytes(b"")

    with pytest.warns(UserWarning, match="3 of 30 images could not be decoded"):
        cached = build(data_copy, tmp_path / "cache")
    good = [i for i in range(30) if i not in (2, 9, 20)]
    assert len(cached) == 27
    assert cached.indices.tolist() == good
    assert cached.targets == [dataset.samples[i][1] for i in good]
    assert [s["index"] for s in cached.skipped] == [2, 9, 20]
    for row, i in enumerate(good):
        np.testing.assert_array_equal(cached.images[row], decode(paths[i]))


def test_all_images_corrupt_is_an_error(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(b"junk")
    with pytest.raises(DatasetError):
        build_image_cache([(str(p), -1) for p in sorted(folder.iterdir())], tmp_path / "cache", verbose=False)
    assert [p for p in (tmp_path / "cache").iterdir()] == []


def test_one_fixed_size_and_transform_path(data_copy, tmp_path):
    from torchvision.transforms.functional import pil_to_tensor

    odd = data_copy / "train" / first_class(data_copy) / "zz_odd.png"
    Image.new("RGB", (40, 50), (200, 10, 30)).save(odd)  # 40 wide, 50 high: resized to the first image's size
    cached = build(data_copy, tmp_path / "cache")
    assert cached.image_size == (64, 64) and len(cached) == 31
    row = [p for p, _ in build_image_dataset(data_copy, "train").samples].index(str(odd))
    assert (cached.images[row] == np.array([200, 10, 30], dtype=np.uint8)[:, None, None]).all()

    small = build(data_copy, tmp_path / "cache32", image_size=32)
    assert small.images.shape == (31, 3, 32, 32)

    with_transform = CachedImages(cached.path, transform=pil_to_tensor)
    image, label = with_transform[5]
    assert torch.equal(image, cached[5][0]) and label == cached.targets[5]


def first_class(root: Path) -> str:
    return sorted(p.name for p in (root / "train").iterdir())[0]


def test_pickles_without_pixels_and_works_in_a_dataloader(synthetic_root, tmp_path):
    cached = build(synthetic_root, tmp_path / "cache")
    _ = cached[0]  # opens the memmap
    blob = pickle.dumps(cached)
    assert len(blob) < 30 * 3 * 64 * 64 // 4, "the memmap must not be pickled into DataLoader workers"
    clone = pickle.loads(blob)
    assert torch.equal(clone[3][0], cached[3][0])
    loader = torch.utils.data.DataLoader(cached, batch_size=8, shuffle=False, num_workers=0)
    images, labels = next(iter(loader))
    assert torch.equal(images, cached.get_batch(range(8))[0]) and torch.equal(labels, cached.labels[:8])


def test_one_entry_per_name_in_a_cache_folder(data_copy, tmp_path):
    data_path = data_copy / "train"  # a folder of class folders given directly as --data_path
    cache_dir = tmp_path / "cache"
    build(data_path, cache_dir)
    build_image_cache(build_image_dataset(data_path, "train").samples, cache_dir, verbose=False, num_workers=0)
    assert sorted(p.name.split("-")[0] for p in cache_dir.iterdir()) == ["images", "train"], "one entry per name"


@pytest.mark.parametrize("field, value", [("num_images", 29), ("key", "0" * 64), ("format_version", 0)])
def test_manifest_that_disagrees_is_not_trusted(synthetic_root, tmp_path, decode_counter, field, value):
    cached = build(synthetic_root, tmp_path / "cache")
    manifest_path = cached.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, field: value}))
    with pytest.raises(DatasetError) if field != "key" else contextlib.nullcontext():
        CachedImages(cached.path)  # the key is only checked against the file list, when building
    decode_counter["n"] = 0
    rebuilt = build(synthetic_root, tmp_path / "cache")
    assert decode_counter["n"] == 30, "a mismatching manifest means a rebuild"
    assert rebuilt.path == cached.path and json.loads(manifest_path.read_text()) == {**manifest, "created": ANY}
