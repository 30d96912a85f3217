"""Tests of the embedded synthetic shapes dataset (utils/data/synthetic.py)."""

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torchvision.datasets import ImageFolder

from utils.data.synthetic import MARKER_NAME, SYNTHETIC_CLASSES, generate_synthetic_dataset, render_sample

SMALL = {"num_classes": 10, "train_per_class": 4, "val_per_class": 2}


def _files(root):
    return sorted(p for p in root.rglob("*.JPEG"))


def _snapshot(root):
    """{relative path: (bytes, mtime_ns)} of every image and of the marker."""
    paths = [*_files(root), root / MARKER_NAME]
    return {p.relative_to(root): (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synth") / "data", **SMALL)


# ------------------------------------------------------------------------------------------------- layout
def test_class_names_are_readable_and_unique():
    assert len(SYNTHETIC_CLASSES) >= 10
    assert len(set(SYNTHETIC_CLASSES)) == len(SYNTHETIC_CLASSES)
    assert SYNTHETIC_CLASSES[:3] == ["00_circle", "01_square", "02_triangle"]
    assert all(name[:2] == f"{k:02d}" and name[2] == "_" for k, name in enumerate(SYNTHETIC_CLASSES))


def test_layout_counts_and_imagefolder(small_root):
    for split, per_class in (("train", 4), ("val", 2)):
        ds = ImageFolder(str(small_root / split))
        assert ds.classes == SYNTHETIC_CLASSES[:10]
        assert len(ds) == 10 * per_class
        assert np.bincount(ds.targets).tolist() == [per_class] * 10
        img, label = ds[len(ds) - 1]
        assert (img.size, img.mode, label) == ((64, 64), "RGB", 9)
    for path in _files(small_root):
        with Image.open(path) as img:
            assert (img.format, img.size, img.mode) == ("JPEG", (64, 64), "RGB")
    assert json.loads((small_root / MARKER_NAME).read_text())["num_classes"] == 10


def test_every_class_renders_and_image_size(tmp_path):
    root = generate_synthetic_dataset(
        tmp_path, num_classes=len(SYNTHETIC_CLASSES), train_per_class=1, val_per_class=1, image_size=32
    )
    ds = ImageFolder(str(root / "val"))
    assert ds.classes == SYNTHETIC_CLASSES
    assert all(img.size == (32, 32) for img, _ in ds)


def test_rejects_bad_parameters(tmp_path):
    with pytest.raises(ValueError):
        generate_synthetic_dataset(tmp_path, num_classes=len(SYNTHETIC_CLASSES) + 1)
    with pytest.raises(ValueError):
        render_sample(len(SYNTHETIC_CLASSES), np.random.default_rng(0))


# ------------------------------------------------------------------------------------ determinism, caching
def test_same_seed_gives_identical_bytes(small_root, tmp_path):
    other = generate_synthetic_dataset(tmp_path / "again", **SMALL)
    files_a, files_b = _files(small_root), _files(other)
    assert [p.relative_to(small_root) for p in files_a] == [p.relative_to(other) for p in files_b]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(files_a, files_b))


def test_different_seed_gives_different_images(small_root, tmp_path):
    other = generate_synthetic_dataset(tmp_path / "seed1", seed=1, **SMALL)
    same = [a.read_bytes() == b.read_bytes() for a, b in zip(_files(small_root), _files(other))]
    assert len(same) == 60 and not any(same)


def test_images_within_a_split_differ(small_root):
    contents = [p.read_bytes() for p in _files(small_root)]
    assert len(set(contents)) == len(contents)


def test_render_sample_is_pure():
    a = render_sample(3, np.random.default_rng([1, 2, 3]))
    b = render_sample(3, np.random.default_rng([1, 2, 3]))
    assert (a.size, a.mode) == ((64, 64), "RGB")
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_second_call_is_a_noop(tmp_path):
    root = generate_synthetic_dataset(tmp_path, **SMALL)
    before = _snapshot(root)
    assert generate_synthetic_dataset(tmp_path, **SMALL) == root
    assert _snapshot(root) == before


def test_missing_marker_regenerates(tmp_path):
    root = generate_synthetic_dataset(tmp_path, **SMALL)
    before = {k: v[0] for k, v in _snapshot(root).items()}
    (root / MARKER_NAME).unlink()
    stray = root / "train" / SYNTHETIC_CLASSES[0] / "stray.JPEG"  # leftover of an interrupted run
    stray.write_bytes(b"partial")
    generate_synthetic_dataset(tmp_path, **SMALL)
    assert not stray.exists()
    assert {k: v[0] for k, v in _snapshot(root).items()} == before


def test_deleted_file_or_stale_staging_regenerates(tmp_path):
    root = generate_synthetic_dataset(tmp_path, **SMALL)
    victim = _files(root)[5]
    content = victim.read_bytes()
    victim.unlink()
    staged = root / ".tinydino_synthetic_tmp" / "train" / SYNTHETIC_CLASSES[0]  # staging left by a killed run
    staged.mkdir(parents=True)
    (staged / "train_00_0000.JPEG").write_bytes(b"partial")
    generate_synthetic_dataset(tmp_path, **SMALL)
    assert victim.read_bytes() == content
    assert not (root / ".tinydino_synthetic_tmp").exists()


def test_changed_parameters_regenerate_cleanly(tmp_path):
    generate_synthetic_dataset(tmp_path, **SMALL)
    root = generate_synthetic_dataset(tmp_path, num_classes=10, train_per_class=2, val_per_class=3)
    assert len(_files(root / "train")) == 20 and len(_files(root / "val")) == 30
    assert json.loads((root / MARKER_NAME).read_text())["val_per_class"] == 3


# ------------------------------------------------------------------------------- colour is not the class
def _render_set(split_id, per_class, num_classes=10):
    images, labels = [], []
    for c in range(num_classes):
        for i in range(per_class):
            img = render_sample(c, np.random.default_rng([11, split_id, c, i]))
            images.append(np.asarray(img, dtype=np.float64) / 255)
            labels.append(c)
    return np.stack(images), np.array(labels)


def _mean_colour(images):
    return images.mean(axis=(1, 2))


def _shape_spectrum(images, rings=12, harmonics=(2, 3, 4, 5, 6, 8, 10)):
    """Translation-, rotation-, colour- and polarity-invariant structure features.

    Per ring of spatial frequency: log power and the strength of a few angular harmonics of the power
    spectrum of the contrast-normalised grayscale image (3-fold symmetry of a triangle, 4-fold of a
    square, stripes concentrate in one direction, ...).
    """
    gray = images @ np.array([0.299, 0.587, 0.114])
    gray = gray - gray.mean(axis=(1, 2), keepdims=True)
    gray = gray / (gray.std(axis=(1, 2), keepdims=True) + 1e-6)
    power = np.abs(np.fft.fftshift(np.fft.fft2(gray), axes=(1, 2))) ** 2
    n = gray.shape[1]
    fy, fx = np.meshgrid(np.arange(n) - n // 2, np.arange(n) - n // 2, indexing="ij")
    ring = np.minimum((np.hypot(fx, fy) / (n // 2) * rings).astype(int), rings)
    theta = np.arctan2(fy, fx)
    feats = []
    for r in range(1, rings):
        sel = ring == r
        p = power[:, sel]
        total = p.sum(axis=1) + 1e-9
        feats.append(np.log(total))
        feats += [np.abs((p * np.exp(1j * h * theta[sel])).sum(axis=1)) / total for h in harmonics]
    return np.stack(feats, axis=1)


def _probe_accuracy(features_fn, train, test):
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    clf.fit(features_fn(train[0]), train[1])
    return clf.score(features_fn(test[0]), test[1])


@pytest.fixture(scope="module")
def probe_sets():
    return _render_set(0, 40), _render_set(1, 20)


def test_mean_colour_does_not_predict_the_class(probe_sets):
    acc = _probe_accuracy(_mean_colour, *probe_sets)
    assert acc <= 2 * 0.1, f"mean colour predicts the class ({acc:.2f}): colours leak class identity"


def test_structure_predicts_the_class(probe_sets):
    colour = _probe_accuracy(_mean_colour, *probe_sets)
    shape = _probe_accuracy(_shape_spectrum, *probe_sets)
    assert shape >= 0.5 and shape >= colour + 0.3, f"structure {shape:.2f} vs colour {colour:.2f}"


def test_nuisances_are_drawn_independently_of_the_class():
    """Same RNG state, different classes: identical background, colours and noise; only the shape differs."""
    for s in range(5):
        a, b = (np.asarray(render_sample(c, np.random.default_rng([5, s]))) for c in (0, 7))
        equal = np.all(a == b, axis=-1).mean()
        assert 0.3 < equal < 0.98, equal
