"""The TinyImageNet val re-layout's meaning: every val image gets the class its annotation line names, with the same
class index as that class's train images (hand-written annotations are the reference)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from utils.data.folders import build_image_dataset

WNIDS = ["n01443537", "n01629819", "n01641577"]
#: val file -> class, in the order of val_annotations.txt (not sorted by class, bounding boxes vary).
VAL_TRUTH = {"val_0.JPEG": WNIDS[2], "val_1.JPEG": WNIDS[0], "val_2.JPEG": WNIDS[2], "val_3.JPEG": WNIDS[1]}


def make_tiny_imagenet(root: Path) -> Path:
    """TinyImageNet's layout: train/<wnid>/images/*.JPEG, val/images/*.JPEG + val/val_annotations.txt, wnids.txt."""
    for i, wnid in enumerate(WNIDS):
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{wnid}_0.JPEG")
    images = root / "val" / "images"
    images.mkdir(parents=True)
    lines = []
    for j, (name, wnid) in enumerate(VAL_TRUTH.items()):
        Image.new("RGB", (8, 8), (0, 30 * j, 0)).save(images / name)
        lines.append(f"{name}\t{wnid}\t{j}\t{j + 1}\t{60 + j}\t{61 + j}\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    return root


def test_val_images_get_their_annotated_class_with_the_train_index(tmp_path):
    root = make_tiny_imagenet(tmp_path / "tiny")
    train = build_image_dataset(root, "train")
    val = build_image_dataset(root, "val")  # re-lays out val/ on first use
    assert train.class_to_idx == {wnid: i for i, wnid in enumerate(sorted(WNIDS))}
    labels = {Path(path).name: target for path, target in val.samples}
    assert labels == {name: train.class_to_idx[wnid] for name, wnid in VAL_TRUTH.items()}
    for name, wnid in VAL_TRUTH.items():
        assert (root / "val" / wnid / name).is_file()
