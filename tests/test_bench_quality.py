"""benchmarks/bench_quality.py on real photos (the Tiny ImageNet subset beside the project, ../shared/data/).

The quick mode trains a few iterations on a few real images; its random-init row is recomputed here from scratch
(timm's model built with the same seed, torchvision's ImageFolder and transforms, the weighted k-NN written out,
scikit-learn, numpy's SVD), so that the benchmark's evaluation is checked against independent code.
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, run_benchmark_quick

ZIP = ROOT.parent / "shared" / "data" / "tiny-imagenet-10.zip"
needs_zip = pytest.mark.skipif(
    not ZIP.is_file(), reason=f"the real-photo zip is absent: expected {ZIP} (../shared/data/ beside the project)"
)
METRICS = {"knn_top1", "knn_sklearn_top1", "linear_top1", "effective_rank"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``bench_quality.py --quick`` with a stand-in ``lightly`` package first on the path that fails on import: the
    run (without ``--peer``) must never import lightly."""
    tmp = tmp_path_factory.mktemp("bench_quality")
    fake = tmp / "fake_site" / "lightly"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('bench_quality imported lightly without --peer')\n")
    # an override equal to the recipe's own value (the run is the recipe's), to be named in the plot's title
    flags = ["--data", str(ZIP), "--work_dir", str(tmp / "work"), "--threads", "1", "--koleo_loss_weight", "0.3"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")]))
        mp.setenv("OMP_NUM_THREADS", "1")
        report, stdout = run_benchmark_quick("bench_quality.py", flags, tmp / "quality.json", timeout=1200)
    return report, stdout, tmp


@needs_zip
@pytest.mark.slow
def test_quick_mode_reports_every_metric_for_both_backbones(quick_run):
    report, stdout, tmp = quick_run
    for row in ("random_init", "trained"):
        assert set(report[row]) >= METRICS, row
        for key in ("knn_top1", "knn_sklearn_top1", "linear_top1"):
            assert 0.0 <= report[row][key] <= 100.0
        assert report[row]["effective_rank"] >= 1.0
    assert report["recipe"] == "photos_patch8" and report["iters"] > 0 and report["seconds"] > 0
    assert report["gain"]["knn_top1"] == pytest.approx(
        report["trained"]["knn_top1"] - report["random_init"]["knn_top1"]
    )
    checkpoint = torch.load(report["checkpoint"], map_location="cpu", weights_only=True)
    assert checkpoint["global_iter"] == report["iters"]
    # the run's own online k-NN of its starting teacher equals the benchmark's random-init row (same weights)
    assert report["trained"]["online_random_init_knn_top1"] == pytest.approx(report["random_init"]["knn_top1"])
    assert [p["iter"] for p in report["curve"]][0] == 0 and report["curve"][-1]["iter"] == report["iters"]
    assert Path(report["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["title"] == f"recipe photos_patch8 --koleo_loss_weight 0.3, {report['iters']} iterations"
    assert "random_init" in stdout and "trained" in stdout
    # everything is written under the work folder: the prepared data too
    assert Path(report["data_root"]).is_relative_to(tmp / "work")


@needs_zip
@pytest.mark.slow
def test_random_init_row_equals_an_independent_computation(quick_run):
    import timm
    from sklearn.neighbors import KNeighborsClassifier
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    import main_dino

    report = quick_run[0]
    args = main_dino.get_args_parser().parse_args(report["flags"])
    torch.manual_seed(args.seed)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        num_classes=0,
        img_size=args.global_crop_size,
        patch_size=args.patch_size,
        dynamic_img_size=True,
        drop_path_rate=args.drop_path_rate,
    ).eval()
    size = args.global_crop_size
    transform = transforms.Compose(
        [
            transforms.Resize(size + 8, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )

    def features(split):
        dataset = ImageFolder(str(Path(report["data_root"]) / split), transform=transform)
        images = torch.stack([image for image, _ in dataset])
        with torch.no_grad():
            return model(images).double(), torch.tensor(dataset.targets)

    train, train_labels = features("train")
    val, val_labels = features("val")

    # weighted k-NN, DINO's rule: cosine similarity, k = 20 neighbours, each votes exp(s / 0.07) for its class
    sims = torch.nn.functional.normalize(val, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    top, index = sims.topk(20, dim=1)
    votes = torch.zeros(len(val), 10, dtype=torch.float64).scatter_add_(1, train_labels[index], (top / 0.07).exp())
    knn_top1 = 100.0 * (votes.argmax(dim=1) == val_labels).double().mean().item()
    assert report["random_init"]["knn_top1"] == pytest.approx(knn_top1, abs=1e-9)

    sklearn = KNeighborsClassifier(n_neighbors=5).fit(train.numpy(), train_labels.numpy())
    sklearn_top1 = 100.0 * (sklearn.predict(val.numpy()) == val_labels.numpy()).mean()
    assert report["random_init"]["knn_sklearn_top1"] == pytest.approx(sklearn_top1, abs=1e-9)

    singular = np.linalg.svd(train.numpy() - train.numpy().mean(axis=0), compute_uv=False)
    p = singular**2 / (singular**2).sum()
    rank = float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))
    assert report["random_init"]["effective_rank"] == pytest.approx(rank, rel=1e-4)


@needs_zip
def test_a_tiny_imagenet_folder_is_prepared_in_the_work_folder_and_left_as_it_was(tmp_path):
    from benchmarks.bench_quality import prepare_data

    source = tmp_path / "tiny-imagenet-10"
    with zipfile.ZipFile(ZIP) as archive:
        names = archive.namelist()
        wanted = [n for n in names if n.endswith(("wnids.txt", "val_annotations.txt"))]
        wanted += [n for n in names if "/train/" in n and n.endswith("_0.JPEG")]
        wanted += [n for n in names if "/val/images/" in n][:20]
        for name in wanted:
            archive.extract(name, tmp_path)
    annotations = source / "val" / "val_annotations.txt"
    listed = {p.name for p in (source / "val" / "images").iterdir()}
    annotations.write_text(
        "".join(line for line in annotations.read_text().splitlines(True) if line.split("\t")[0] in listed)
    )
    before = sorted(str(p.relative_to(source)) for p in source.rglob("*"))

    root = prepare_data(source, tmp_path / "work")

    assert sorted(str(p.relative_to(source)) for p in source.rglob("*")) == before
    assert root.is_relative_to(tmp_path / "work")
    wnid_of = dict(line.split("\t")[:2] for line in annotations.read_text().splitlines())
    moved = {p.name: p.parent.name for p in (root / "val").glob("*/*.JPEG")}
    assert moved == wnid_of and not (root / "val" / "images").exists()


@needs_zip
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lightly") is None, reason="lightly is not installed (--peer only)")
def test_peer_row_is_evaluated_like_ours(tmp_path):
    flags = ["--data", str(ZIP), "--work_dir", str(tmp_path / "work"), "--threads", "1", "--peer"]
    report, stdout = run_benchmark_quick("bench_quality.py", flags, tmp_path / "quality.json", timeout=1200)
    assert set(report["peer"]) >= METRICS and report["peer"]["images_per_s"] > 0
    assert Path(report["peer"]["checkpoint"]).is_file() and "peer" in stdout
