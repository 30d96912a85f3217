"""Where the decoded-image cache lives: outside the dataset, in a per-user cache folder; the dataset stays untouched.

Every test points ``XDG_CACHE_HOME`` (or ``--cache_dir``) into its own temp folder, so nothing is written elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

import main_dino
from utils.data.folders import build_image_dataset
from utils.data.image_cache import default_cache_dir
from utils.data.image_cache_build import build_image_cache, cached_image_dataset
from utils.data.synthetic import generate_synthetic_dataset

ROOT = Path(__file__).resolve().parents[2]

#: A pretraining run of a few seconds on a 2-core CPU (kept here so this file does not depend on conftest).
TINY_RUN = [
    "--arch", "vit_tiny", "--patch_size", "16", "--global_crop_size", "32", "--local_crop_size", "16",
    "--out_dim", "64", "--batch_size_per_gpu", "8", "--num_workers", "0", "--warmup_epochs", "1",
    "--epochs", "1", "--max_iters", "2", "--print_freq", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """10 classes x 4 train / 1 val images, 64x64 JPEGs; tests copy it before using it."""
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), train_per_class=4, val_per_class=1)


@pytest.fixture
def xdg(tmp_path, monkeypatch) -> Path:
    """A private ``XDG_CACHE_HOME``."""
    path = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(path))
    return path


def tree(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (hidden ones included) with its kind, size and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            out[str(path.relative_to(root))] = (path.is_dir(), st.st_size, st.st_mtime_ns)
    return out


def decode(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).transpose(2, 0, 1)


def cache_entries(folder: Path) -> list[str]:
    """Names of the cache entries (``<name>-<key16>`` folders holding a manifest) anywhere below ``folder``."""
    return sorted(p.parent.name for p in folder.rglob("manifest.json"))


def test_default_cache_dir_is_per_user_and_per_dataset(tmp_path, monkeypatch):
    data = tmp_path / "datasets" / "pets"
    data.mkdir(parents=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = default_cache_dir(data)
    assert folder.parent == tmp_path / "xdg" / "tinydino"
    assert folder.name.startswith("pets-"), "the folder name says which dataset it caches"
    # the same dataset however it is spelled -> the same folder; another dataset of the same name -> another one
    monkeypatch.chdir(tmp_path / "datasets")
    assert default_cache_dir("pets") == default_cache_dir(f"{data}/") == folder
    other = tmp_path / "elsewhere" / "pets"
    other.mkdir(parents=True)
    assert default_cache_dir(other) != folder

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir(data).parent == tmp_path / "home" / ".cache" / "tinydino"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # the XDG spec: a relative value is ignored
    assert default_cache_dir(data).parent == tmp_path / "home" / ".cache" / "tinydino"


def test_a_run_leaves_an_imagefolder_root_as_it_was(synthetic, tmp_path, xdg):
    data = Path(shutil.copytree(synthetic / "train", tmp_path / "pets"))  # an ImageFolder root as --data_path
    classes = sorted(p.name for p in data.iterdir())
    before = tree(data)
    flags = [*TINY_RUN, "--data_path", str(data), "--output_dir", str(tmp_path / "out"), "--cache_images", "on"]
    assert main_dino.cli(flags) == 0
    assert tree(data) == before, "nothing under --data_path is created, changed or removed"
    assert cache_entries(xdg) == [e for e in cache_entries(xdg) if e.startswith("train-")] != []
    assert not default_cache_dir(data).resolve().is_relative_to(data.resolve())
    # torchvision's own ImageFolder (what notebooks and peers use) still reads the folder, with the same classes
    after = ImageFolder(str(data))
    assert after.classes == classes and len(after) == 40


def test_cache_dir_flag_overrides_the_default(synthetic, tmp_path, xdg):
    data = Path(shutil.copytree(synthetic, tmp_path / "data"))
    flags = [*TINY_RUN, "--data_path", str(data), "--output_dir", str(tmp_path / "out"), "--cache_images", "on"]
    assert main_dino.cli([*flags, "--cache_dir", str(tmp_path / "mine"), "--knn_every", "1"]) == 0
    assert cache_entries(tmp_path / "mine") != [] and not xdg.exists()
    assert sorted(e.split("-")[0] for e in cache_entries(tmp_path / "mine")) == ["train", "val"]


def _can_mount_read_only(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    script = f"mount --bind {probe} {probe} && mount -o remount,bind,ro {probe} {probe} && ! touch {probe}/x"
    try:
        done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and not (probe / "x").exists()


@pytest.mark.slow
def test_a_run_on_a_read_only_dataset(synthetic, tmp_path):
    """The data folder is mounted read-only (a private mount namespace): the run caches both splits and trains."""
    if shutil.which("unshare") is None or not _can_mount_read_only(tmp_path):
        pytest.skip("no private read-only bind mount here (the tree-snapshot test above covers no-writes)")
    data = Path(shutil.copytree(synthetic, tmp_path / "data"))
    os.chmod(data, 0o555)  # also read-only by permissions (which root ignores; the mount does not)
    before = tree(data)
    run = [sys.executable, "main_dino.py", *TINY_RUN, "--data_path", str(data), "--output_dir", str(tmp_path / "out")]
    run += ["--cache_images", "on", "--knn_every", "1"]
    script = f'mount --bind "{data}" "{data}" && mount -o remount,bind,ro "{data}" "{data}" && exec "$@"'
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "OMP_NUM_THREADS": "1"}
    command = ["unshare", "-rm", "sh", "-c", script, "sh", *run]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    os.chmod(data, 0o755)
    assert done.returncode == 0, done.stderr[-3000:]
    assert tree(data) == before
    assert sorted(e.split("-")[0] for e in cache_entries(tmp_path / "xdg")) == ["train", "val"]


def test_a_leftover_tinydino_cache_in_the_dataset_is_ignored(synthetic, tmp_path, xdg):
    data = Path(shutil.copytree(synthetic / "train", tmp_path / "pets"))
    samples = build_image_dataset(data, "train").samples
    # An old-style cache inside the dataset, for exactly these files, but with wrong pixels; plus a stray image in it.
    old = build_image_cache(samples, data / ".tinydino_cache", name="train", num_workers=0, verbose=False)
    np.lib.format.open_memmap(old / "images.npy", mode="r+")[:] = 0
    Image.new("RGB", (8, 8)).save(data / ".tinydino_cache" / "stray.png")

    dataset = build_image_dataset(data, "train")
    assert ".tinydino_cache" not in dataset.classes and len(dataset.classes) == 10 and len(dataset) == 40
    cached = cached_image_dataset(dataset, default_cache_dir(data), name="train", num_workers=0, verbose=False)
    assert not cached.path.resolve().is_relative_to(data.resolve())
    for row, (path, _) in enumerate(dataset.samples):
        np.testing.assert_array_equal(cached.images[row], decode(path), err_msg=path)
