"""TinyImageNet preparation (utils/data/tinyimagenet.py): a miniature release written in the real on-disk layout, and
the real 10-class subset zip of the release beside the project; never the network."""

from __future__ import annotations

import hashlib
import io
import shutil
import urllib.request
import zipfile
from pathlib import Path

import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

import main_dino
from utils.data import download, tinyimagenet
from utils.data.folders import build_image_dataset, has_labels
from utils.data.tinyimagenet import download_tiny_imagenet, relayout_tiny_imagenet_val
from utils.runtime.errors import DatasetError

WNIDS = ["n01443537", "n01629819", "n02124075"]  # goldfish, European fire salamander, Egyptian cat
WORDS = {
    "n01443537": "goldfish, Carassius auratus",
    "n01629819": "European fire salamander, Salamandra salamandra",
    "n02124075": "Egyptian cat",
}
N_TRAIN_PER_CLASS = 3
N_VAL = 8  # val_0 .. val_7, classes assigned round-robin (not sorted order) so every class appears in val


def _jpeg_bytes(seed: int) -> bytes:
    """A tiny JPEG whose content depends on ``seed`` (so moved files can be identified by their bytes)."""
    img = Image.new("RGB", (8, 8), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    img.putpixel((seed % 8, (seed // 8) % 8), (255 - (seed % 256), 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _make_tiny_imagenet(root: Path) -> dict:
    """Write a miniature tiny-imagenet-200 at ``root`` in the official layout; return the val ground truth.

    Returned dict: ``{"val": {filename: (wnid, sha1)}}``.
    """
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    # the official wnids.txt is not sorted; ImageFolder sorts class folders itself
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in reversed(WNIDS)))
    (root / "words.txt").write_text("".join(f"{w}\t{WORDS[w]}\n" for w in WNIDS))
    seed = 0
    for wnid in WNIDS:
        img_dir = root / "train" / wnid / "images"
        img_dir.mkdir(parents=True)
        boxes = []
        for i in range(N_TRAIN_PER_CLASS):
            name = f"{wnid}_{i}.JPEG"
            (img_dir / name).write_bytes(_jpeg_bytes(seed))
            seed += 1
            boxes.append(f"{name}\t{i}\t{i + 1}\t{40 + i}\t{50 + i}\n")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    val_images = root / "val" / "images"
    val_images.mkdir(parents=True)
    truth = {}
    lines = []
    order = [WNIDS[1], WNIDS[0], WNIDS[2]]
    for i in range(N_VAL):
        name = f"val_{i}.JPEG"
        wnid = order[i % len(order)]
        data = _jpeg_bytes(1000 + i)
        (val_images / name).write_bytes(data)
        truth[name] = (wnid, hashlib.sha1(data).hexdigest())
        lines.append(f"{name}\t{wnid}\t{i}\t{2 * i}\t{30 + i}\t{40 + i}\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    (root / "test" / "images").mkdir(parents=True)
    (root / "test" / "images" / "test_0.JPEG").write_bytes(_jpeg_bytes(5000))
    return {"val": truth}


def _snapshot(root: Path) -> dict:
    """Every path under ``root`` (files and folders) with its mtime in ns."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _assert_val_placed(root: Path, truth: dict) -> None:
    """Each val image is in val/<wnid>/ with its original bytes, and val/images is gone."""
    val = root / "val"
    assert not (val / "images").exists()
    for name, (wnid, digest) in truth.items():
        path = val / wnid / name
        assert path.is_file(), f"{name} not in {wnid}/"
        assert _sha1(path) == digest, f"{name} content changed"
    placed = sorted(p.name for p in val.glob("*/*.JPEG"))
    assert placed == sorted(truth)
    assert (val / "val_annotations.txt").is_file()


@pytest.fixture
def tiny(tmp_path):
    root = tmp_path / "data" / "tiny-imagenet-200"
    truth = _make_tiny_imagenet(root)
    return root, truth["val"]


# ------------------------------------------------------------------------------------------------------------------
# re-layout
# ------------------------------------------------------------------------------------------------------------------


def test_relayout_places_every_val_image_and_imagefolder_loads_both_splits(tiny):
    root, truth = tiny
    moved = relayout_tiny_imagenet_val(root)
    assert moved == N_VAL
    _assert_val_placed(root, truth)

    train = ImageFolder(str(root / "train"))
    val = ImageFolder(str(root / "val"))
    assert train.classes == sorted(WNIDS)
    assert train.class_to_idx == val.class_to_idx
    # train: nested images/ folders are walked, *_boxes.txt are skipped by the extension filter
    assert len(train) == len(WNIDS) * N_TRAIN_PER_CLASS
    assert all(p.endswith(".JPEG") for p, _ in train.samples)
    for path, label in train.samples:
        assert Path(path).parent.name == "images"
        assert Path(path).parent.parent.name == train.classes[label]
    # val: labels come from the annotations file
    assert len(val) == N_VAL
    for path, label in val.samples:
        assert label == train.class_to_idx[truth[Path(path).name][0]]
    image, label = val[0]
    assert image.size == (8, 8) and isinstance(label, int)


def test_relayout_second_run_changes_nothing(tiny):
    root, truth = tiny
    relayout_tiny_imagenet_val(root)
    before = _snapshot(root)
    assert relayout_tiny_imagenet_val(root) == 0
    assert _snapshot(root) == before
    _assert_val_placed(root, truth)


def test_relayout_interrupted_midway_completes_on_rerun(tiny, monkeypatch):
    root, truth = tiny
    real_move = tinyimagenet._move
    calls = {"n": 0}

    def crashing_move(src, dst):
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        calls["n"] += 1
        real_move(src, dst)

    monkeypatch.setattr(tinyimagenet, "_move", crashing_move)
    with pytest.raises(KeyboardInterrupt):
        relayout_tiny_imagenet_val(root)
    # after the crash: every image exists exactly once (in images/ or in its class folder), none lost
    val = root / "val"
    left = sorted(p.name for p in (val / "images").iterdir())
    placed = sorted(p.name for p in val.glob("n*/*.JPEG"))
    assert len(placed) == 3 and len(left) == N_VAL - 3
    assert sorted(left + placed) == sorted(truth)

    monkeypatch.setattr(tinyimagenet, "_move", real_move)
    assert relayout_tiny_imagenet_val(root) == N_VAL - 3
    _assert_val_placed(root, truth)


def test_relayout_crash_after_last_move_removes_empty_images_folder(tiny):
    root, truth = tiny
    relayout_tiny_imagenet_val(root)
    (root / "val" / "images").mkdir()  # died between the last move and the rmdir
    (root / "val" / "val_annotations.txt").unlink()  # not needed for an empty folder
    assert relayout_tiny_imagenet_val(root) == 0
    assert not (root / "val" / "images").exists()
    assert len(ImageFolder(str(root / "val"))) == N_VAL


def test_relayout_missing_annotations_raises(tiny):
    root, _ = tiny
    (root / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DatasetError, match="val_annotations.txt"):
        relayout_tiny_imagenet_val(root)
    assert len(list((root / "val" / "images").iterdir())) == N_VAL  # nothing moved
    # build_image_dataset detects the TinyImageNet val layout and reports the same problem
    with pytest.raises(DatasetError, match="val_annotations.txt"):
        build_image_dataset(root, split="val")


def test_relayout_unlisted_file_raises_before_moving(tiny):
    root, _ = tiny
    (root / "val" / "images" / "stray.JPEG").write_bytes(_jpeg_bytes(7))
    with pytest.raises(DatasetError, match="stray.JPEG"):
        relayout_tiny_imagenet_val(root)
    assert len(list((root / "val" / "images").iterdir())) == N_VAL + 1


def test_relayout_reports_missing_val_images(tiny):
    root, _ = tiny
    (root / "val" / "images" / "val_2.JPEG").unlink()
    with pytest.raises(DatasetError, match="missing.*val_2.JPEG"):
        relayout_tiny_imagenet_val(root)


def test_relayout_malformed_annotations_raise(tiny):
    root, _ = tiny
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG n01443537 0 0 1 1\n")  # spaces, not tabs
    with pytest.raises(DatasetError, match=r"val_annotations.txt:1"):
        relayout_tiny_imagenet_val(root)


# ------------------------------------------------------------------------------------------------------------------
# download
# ------------------------------------------------------------------------------------------------------------------


def _zip_tree(src_root: Path, zip_path: Path) -> None:
    """Zip ``src_root`` like the official archive: a top-level ``tiny-imagenet-200/`` with directory entries."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.write(src_root, "tiny-imagenet-200/")
        for path in sorted(src_root.rglob("*")):
            arcname = "tiny-imagenet-200/" + path.relative_to(src_root).as_posix() + ("/" if path.is_dir() else "")
            zf.write(path, arcname)


@pytest.fixture
def served_zip(tmp_path, monkeypatch):
    """A zip of the miniature dataset served through a file:// URL set as TINY_IMAGENET_URL."""
    src = tmp_path / "remote_src" / "tiny-imagenet-200"
    truth = _make_tiny_imagenet(src)["val"]
    zip_path = tmp_path / "remote" / "tiny-imagenet-200.zip"
    _zip_tree(src, zip_path)
    monkeypatch.setattr(tinyimagenet, "TINY_IMAGENET_URL", zip_path.as_uri())
    return zip_path, truth


def test_download_tiny_imagenet_end_to_end(tmp_path, served_zip, monkeypatch, capsys):
    zip_src, truth = served_zip
    root = tmp_path / "data" / "tiny-imagenet-200"
    real_download = tinyimagenet.download_url
    calls = []

    def counting_download(url, dest, **kw):
        calls.append(url)
        return real_download(url, dest, chunk_size=1024)

    monkeypatch.setattr(tinyimagenet, "download_url", counting_download)
    assert download_tiny_imagenet(root) == root
    assert calls == [zip_src.as_uri()]
    zip_path = tmp_path / "data" / "tiny-imagenet-200.zip"
    assert zip_path.read_bytes() == zip_src.read_bytes()
    assert not (tmp_path / "data" / "tiny-imagenet-200.zip.part").exists()
    assert not (tmp_path / "data" / ".tiny-imagenet-200.extracting").exists()
    err = capsys.readouterr().err
    size = f"{zip_src.stat().st_size / 1024:.3g}k"  # tqdm's byte count: binary prefix, 3 significant digits
    assert "downloading tiny-imagenet-200.zip: 100%" in err and f"{size}/{size}" in err, err
    n_members = len(zipfile.ZipFile(zip_src).infolist())
    assert "extracting tiny-imagenet-200.zip: 100%" in err and f"{n_members}/{n_members}" in err
    for name in ("wnids.txt", "words.txt", "val/val_annotations.txt"):
        assert (root / name).is_file()
    for wnid in WNIDS:
        assert len(list((root / "train" / wnid / "images").glob("*.JPEG"))) == N_TRAIN_PER_CLASS
        assert (root / "train" / wnid / f"{wnid}_boxes.txt").is_file()
    _assert_val_placed(root, truth)

    # second call: already prepared -> no download, no change
    before = _snapshot(tmp_path / "data")
    assert download_tiny_imagenet(root) == root
    assert calls == [zip_src.as_uri()]
    assert _snapshot(tmp_path / "data") == before

    train = build_image_dataset(root, "train")
    val = build_image_dataset(root, "val")
    assert train.class_to_idx == val.class_to_idx and has_labels(train) and has_labels(val)


def test_download_reuses_existing_zip_and_custom_root_name(tmp_path, served_zip, monkeypatch):
    zip_src, truth = served_zip
    data = tmp_path / "data"
    data.mkdir()
    (data / "tiny-imagenet-200.zip").write_bytes(zip_src.read_bytes())

    def no_download(*a, **kw):
        raise AssertionError("must not download when a valid zip exists")

    monkeypatch.setattr(tinyimagenet, "download_url", no_download)
    root = data / "tin"  # root name differs from the folder inside the zip
    (data / ".tin.extracting" / "tiny-imagenet-200").mkdir(parents=True)  # left over by an interrupted extraction
    (data / ".tin.extracting" / "junk.txt").write_text("x")
    download_tiny_imagenet(root)
    assert (root / "wnids.txt").is_file()
    assert not (data / "tiny-imagenet-200").exists() and not (data / ".tin.extracting").exists()
    _assert_val_placed(root, truth)


def test_download_replaces_invalid_zip(tmp_path, served_zip):
    _, truth = served_zip
    data = tmp_path / "data"
    data.mkdir()
    (data / "tiny-imagenet-200.zip").write_bytes(b"not a zip, e.g. an HTML error page")
    root = download_tiny_imagenet(data / "tiny-imagenet-200")
    assert zipfile.is_zipfile(data / "tiny-imagenet-200.zip")
    _assert_val_placed(root, truth)


def test_download_of_extracted_but_not_relaid_out_only_relayouts(tiny, monkeypatch):
    root, truth = tiny
    monkeypatch.setattr(tinyimagenet, "download_url", lambda *a, **kw: pytest.fail("downloaded"))
    download_tiny_imagenet(root)
    _assert_val_placed(root, truth)


def test_download_uses_a_zip_named_after_the_folder(tmp_path, served_zip, monkeypatch):
    """A subset of the release in its format, ``<name>.zip`` beside ``--data_path <parent>/<name>``: used as is."""
    zip_src, truth = served_zip
    data = tmp_path / "data"
    data.mkdir()
    subset_zip = data / "tiny-imagenet-3.zip"
    subset_zip.write_bytes(zip_src.read_bytes())  # its top folder is tiny-imagenet-200/, as in the release
    (data / "tiny-imagenet-200.zip").write_bytes(b"PK junk: the folder's own zip comes first")
    monkeypatch.setattr(tinyimagenet, "download_url", lambda *a, **kw: pytest.fail("downloaded"))
    root = download_tiny_imagenet(data / "tiny-imagenet-3")
    _assert_val_placed(root, truth)
    assert subset_zip.read_bytes() == zip_src.read_bytes(), "the zip is kept"


def test_download_failure_says_where_to_put_the_file(tmp_path, monkeypatch):
    unreachable = tmp_path / "unreachable" / "tiny-imagenet-200.zip"
    monkeypatch.setattr(tinyimagenet, "TINY_IMAGENET_URL", unreachable.as_uri())
    root = tmp_path / "data" / "tiny-imagenet-200"
    with pytest.raises(DatasetError) as info:
        download_tiny_imagenet(root)
    msg = str(info.value)
    assert "by hand" in msg and str(tmp_path / "data" / "tiny-imagenet-200.zip") in msg and "\n" not in msg
    assert not (tmp_path / "data" / "tiny-imagenet-200.zip").exists()
    assert not (tmp_path / "data" / "tiny-imagenet-200.zip.part").exists()


def test_download_url_truncated_transfer_is_an_error(tmp_path, monkeypatch):
    class FakeResponse(io.BytesIO):
        headers = {"Content-Length": "100"}

    monkeypatch.setattr(download.urllib.request, "urlopen", lambda url, timeout: FakeResponse(b"x" * 40))
    dest = tmp_path / "f.zip"
    with pytest.raises(DatasetError, match="40 of 100 bytes"):
        download.download_url("http://example.invalid/f.zip", dest)
    assert not dest.exists() and not (tmp_path / "f.zip.part").exists()


def test_download_refuses_non_empty_incomplete_root(tmp_path, served_zip):
    root = tmp_path / "data" / "tiny-imagenet-200"
    (root / "train").mkdir(parents=True)  # e.g. a half-finished manual unzip
    with pytest.raises(DatasetError, match="delete it"):
        download_tiny_imagenet(root)


def test_build_tiny_imagenet_root(tiny):
    root, truth = tiny
    relayout_tiny_imagenet_val(root)
    train = build_image_dataset(root, "train")
    val = build_image_dataset(root, "val")
    assert isinstance(train, ImageFolder) and isinstance(val, ImageFolder)
    assert len(train) == len(WNIDS) * N_TRAIN_PER_CLASS and len(val) == N_VAL
    assert train.classes == sorted(WNIDS) and train.class_to_idx == val.class_to_idx
    assert has_labels(train) and has_labels(val)
    for path, label in val.samples:
        assert label == val.class_to_idx[truth[Path(path).name][0]]


def test_build_relayouts_tiny_imagenet_val_on_the_fly(tiny, capsys):
    root, truth = tiny
    val = build_image_dataset(root, "val")
    _assert_val_placed(root, truth)
    assert len(val) == N_VAL and val.classes == sorted(WNIDS)
    assert "re-laying out" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# the real subset zip, through main_dino.py --download
# ------------------------------------------------------------------------------------------------------------------

REAL_ZIP = Path(__file__).resolve().parents[3] / "shared" / "data" / "tiny-imagenet-10.zip"

TINY_RUN = [
    "--arch", "vit_tiny", "--patch_size", "16", "--global_crop_size", "32", "--local_crop_size", "16",
    "--out_dim", "64", "--batch_size_per_gpu", "8", "--num_workers", "0", "--warmup_epochs", "1",
    "--epochs", "1", "--max_iters", "1", "--print_freq", "1", "--knn_every", "0",
]  # fmt: skip


def _val_truth(zip_path: Path) -> dict[str, tuple[str, str]]:
    """{file name: (wnid, sha1 of the bytes)} for every val image, read from the zip's own val_annotations.txt."""
    truth = {}
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        (annotations,) = [n for n in names if n.endswith("val/val_annotations.txt")]
        top = annotations[: -len("val/val_annotations.txt")]
        for line in zf.read(annotations).decode().splitlines():
            if line.strip():
                fname, wnid = line.split("\t")[:2]
                truth[fname] = (wnid, hashlib.sha1(zf.read(f"{top}val/images/{fname}")).hexdigest())
    return truth


@pytest.mark.slow
@pytest.mark.skipif(not REAL_ZIP.is_file(), reason=f"{REAL_ZIP} (beside the project) is not here")
def test_main_dino_download_prepares_the_real_subset_zip(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the zip is already where the download puts it: nothing may be fetched")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data = tmp_path / "X"
    data.mkdir()
    shutil.copy(REAL_ZIP, data / "tiny-imagenet-10.zip")
    root = data / "tiny-imagenet-10"
    flags = [*TINY_RUN, "--data_path", str(root), "--download", "--output_dir", str(tmp_path / "out")]
    assert main_dino.cli(flags) == 0

    truth = _val_truth(REAL_ZIP)
    assert len(truth) == 500 and len({wnid for wnid, _ in truth.values()}) == 10
    val = root / "val"
    assert not (val / "images").exists()
    assert sorted(p.name for p in val.iterdir() if p.is_dir()) == sorted({wnid for wnid, _ in truth.values()})
    placed = {p.name: (p.parent.name, hashlib.sha1(p.read_bytes()).hexdigest()) for p in val.glob("*/*")}
    assert placed == truth, "every val image sits in the class folder val_annotations.txt names, bytes unchanged"
    # torchvision reads both splits with one class -> label mapping
    train_set, val_set = ImageFolder(str(root / "train")), ImageFolder(str(val))
    assert train_set.class_to_idx == val_set.class_to_idx and len(train_set) == 5000 and len(val_set) == 500
    for path, label in val_set.samples:
        assert val_set.classes[label] == truth[Path(path).name][0]
