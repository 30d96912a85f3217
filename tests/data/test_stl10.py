"""STL-10 transfer: the binary format, loading official-layout weights, few-shot statistics, eval_stl10.py."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval_stl10
from tests.conftest import run_script
from utils.data.stl10 import STL10Binary, download_stl10, stl10_transform, write_stl10_binary
from utils.eval.features import TokenFeatures, extract_features
from utils.eval.fewshot import (
    confidence_interval,
    linear_probe,
    nearest_mean_predict,
    run_fewshot,
    sample_episode,
    summarize_accuracies,
    train_logistic_regression,
)
from utils.model.vit import build_backbone
from utils.model.weights import build_pretrained_backbone
from utils.runtime.errors import DatasetError

S = 96  # STL-10 image side


# ----------------------------------------------------------------------------------------------- helpers


def official_bytes(images_hwc: np.ndarray) -> bytes:
    """STL-10 X-file bytes written straight from the format's definition: byte ``c*96*96 + x*96 + y`` of an image is
    channel ``c`` of the pixel in row ``y``, column ``x`` (independent of utils.data.stl10's writer)."""
    n = images_hwc.shape[0]
    buf = np.zeros((n, 3 * S * S), dtype=np.uint8)
    ys, xs, cs = np.indices((S, S, 3))
    for i in range(n):
        buf[i, cs * S * S + xs * S + ys] = images_hwc[i, ys, xs, cs]
    return buf.tobytes()


def asymmetric_image() -> np.ndarray:
    """Red top-left quadrant, green top-right quadrant, blue = a row/column gradient: any transposition, flip or
    channel swap changes it."""
    img = np.zeros((S, S, 3), dtype=np.uint8)
    img[:48, :48, 0] = 255
    img[:48, 48:, 1] = 200
    ys, xs = np.indices((S, S))
    img[:, :, 2] = (ys + 2 * xs) % 256
    return img


def write_by_hand(root: Path, split: str, images: np.ndarray, labels_on_disk: list[int], names=None) -> Path:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}_X.bin").write_bytes(official_bytes(images))
    (folder / f"{split}_y.bin").write_bytes(bytes(labels_on_disk))
    names = names or ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    return folder


def mini_stl10(root: Path, train_per_class: int = 6, test_per_class: int = 3, seed: int = 0) -> Path:
    """10 classes of noise images; each class has a darker band at its own rows and channel (learnable)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(10), n)
        images = rng.integers(0, 256, size=(labels.size, S, S, 3), dtype=np.uint8)
        for i, c in enumerate(labels):
            images[i, 9 * c : 9 * c + 12, :, c % 3] //= 3
        perm = rng.permutation(labels.size)  # the official files are not sorted by class
        write_stl10_binary(root, split, images[perm], labels[perm])
    return root


# ----------------------------------------------------------------------------------------------- data


def test_handwritten_binary_reads_back_pixel_exact_upright_with_labels_shifted(tmp_path):
    rng = np.random.default_rng(1)
    images = np.stack([asymmetric_image(), rng.integers(0, 256, (S, S, 3), dtype=np.uint8)])
    folder = write_by_hand(tmp_path, "train", images, [1, 10])
    write_by_hand(tmp_path, "test", images[:1], [3])

    train = STL10Binary(tmp_path, "train")
    assert len(train) == 2 and train.targets == [0, 9]
    assert train.classes[0] == "airplane" and train.classes[9] == "truck"
    image, label = train[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (S, S)
    assert label == 0 and isinstance(label, int)
    pixels = np.asarray(image)
    assert np.array_equal(pixels, images[0])
    assert tuple(pixels[10, 10]) == (255, 0, (10 + 20) % 256)  # top-left: red
    assert tuple(pixels[10, 80])[:2] == (0, 200)  # top-right: green (a transposed image has it bottom-left)
    assert tuple(pixels[80, 10])[:2] == (0, 0)
    assert np.array_equal(np.asarray(train[1][0]), images[1]) and train[1][1] == 9
    assert STL10Binary(tmp_path, "test")[0][1] == 2
    # the trap the reader avoids: a plain reshape of the bytes gives the transposed image
    naive = np.fromfile(folder / "train_X.bin", dtype=np.uint8)[: 3 * S * S].reshape(3, S, S).transpose(1, 2, 0)
    assert not np.array_equal(naive, images[0]) and np.array_equal(naive, images[0].transpose(1, 0, 2))


def test_writer_is_the_exact_inverse_of_the_format(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (3, S, S, 3), dtype=np.uint8)
    folder = write_stl10_binary(tmp_path, "test", images, [0, 9, 4])
    assert (folder / "test_X.bin").read_bytes() == official_bytes(images)
    assert (folder / "test_y.bin").read_bytes() == bytes([1, 10, 5])


def test_dataset_is_memory_mapped_pickles_small_and_transforms(tmp_path):
    mini_stl10(tmp_path, train_per_class=2, test_per_class=1)
    data = STL10Binary(tmp_path, "train", transform=stl10_transform(72, 64))
    first = data[0][0]
    assert first.shape == (3, 64, 64) and first.dtype == torch.float32
    assert isinstance(data._images, np.memmap)
    blob = pickle.dumps(data)  # what a spawned data-loader worker receives
    assert len(blob) < 20_000  # not the 20 x 27648 bytes of images
    assert torch.equal(pickle.loads(blob)[0][0], first)


def test_missing_truncated_or_foreign_files_are_one_line_errors(tmp_path):
    with pytest.raises(DatasetError, match="--download"):
        STL10Binary(tmp_path / "nowhere", "train")
    mini_stl10(tmp_path, train_per_class=1, test_per_class=1)
    x_file = tmp_path / "stl10_binary" / "train_X.bin"
    x_file.write_bytes(x_file.read_bytes()[:-5])
    with pytest.raises(DatasetError, match="truncated"):
        STL10Binary(tmp_path, "train")
    (tmp_path / "stl10_binary" / "test_y.bin").write_bytes(bytes(range(10)))  # 0-based labels: not STL-10's
    with pytest.raises(DatasetError, match=r"outside 1\.\.10"):
        STL10Binary(tmp_path, "test")


def test_download_extracts_the_archive_safely_and_only_once(tmp_path):
    source = mini_stl10(tmp_path / "src", train_per_class=1, test_per_class=1)
    archive = tmp_path / "stl10_binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "stl10_binary", arcname="stl10_binary")
        evil = tarfile.TarInfo("../escaped.txt")
        evil.size = 3
        tar.addfile(evil, io.BytesIO(b"bad"))
        link = tarfile.TarInfo("stl10_binary/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    root = tmp_path / "data" / "stl10"
    assert download_stl10(root, url=archive.as_uri()) == root
    assert (root / "stl10_binary.tar.gz").is_file()  # the archive is kept
    assert not (root.parent / "escaped.txt").exists() and not (root / "escaped.txt").exists()
    assert not (root / "stl10_binary" / "link").exists()
    assert not any(p.name.startswith(".") for p in root.iterdir())  # no temp folder left
    reread = STL10Binary(root, "train")
    assert np.array_equal(np.asarray(reread[0][0]), np.asarray(STL10Binary(source, "train")[0][0]))
    (root / "stl10_binary.tar.gz").unlink()
    download_stl10(root, url=(tmp_path / "gone.tar.gz").as_uri())  # already there: nothing is fetched


# ----------------------------------------------------------------------------------------------- features and weights

#: The parameter names of the official DINO ViT backbone (facebookresearch/dino vision_transformer.py), per block.
OFFICIAL_BLOCK_KEYS = [
    f"{module}.{p}"
    for module in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    for p in ("weight", "bias")
]


def official_keys(depth: int) -> set[str]:
    top = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    return top | {f"blocks.{i}.{k}" for i in range(depth) for k in OFFICIAL_BLOCK_KEYS}


def test_feature_modes():
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", 16, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(TokenFeatures()(model, x), model(x), atol=1e-6)
        last_two = model.get_intermediate_layers(x, 2)
        cls2 = TokenFeatures(n_last_blocks=2)(model, x)
        assert cls2.shape == (2, 384) and torch.equal(cls2[:, :192], last_two[0][:, 0])
        mean2 = TokenFeatures(n_last_blocks=2, use_cls=False)(model, x)
        assert torch.allclose(mean2[:, 192:], last_two[1][:, 1:].mean(dim=1))
        assert not torch.allclose(mean2[:, 192:], cls2[:, 192:])


def test_official_layouts_load_and_give_identical_stl10_features(tmp_path):
    mini_stl10(tmp_path / "data", train_per_class=1, test_per_class=1)
    data = STL10Binary(tmp_path / "data", "test", transform=stl10_transform(40, 32))
    torch.manual_seed(5)
    source = build_backbone("vit_tiny", 16, 32).eval()
    weights = source.state_dict()
    assert set(weights) == official_keys(12)  # timm's names are the official DINO names
    head = {"head.mlp.0.weight": torch.zeros(8, 192), "head.last_layer.weight_g": torch.ones(8, 1)}
    backbone_only = tmp_path / "dino_vittiny16_pretrain.pth"
    torch.save(weights, backbone_only)
    full = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "teacher": {"module.backbone." + k: v for k, v in weights.items()}
            | {"module." + k: v for k, v in head.items()},
            "student": {"backbone." + k: v.clone() + 1 for k, v in weights.items()} | head,
            "epoch": 100,
        },
        full,
    )
    feature_fn = TokenFeatures(n_last_blocks=2, use_cls=False)
    expected, labels = extract_features(source, data, torch.device("cpu"), 4, 0, feature_fn)
    for path, key in ((backbone_only, "teacher"), (full, "teacher")):
        model = build_pretrained_backbone("vit_tiny", 16, 32, str(path), checkpoint_key=key)
        got, got_labels = extract_features(model, data, torch.device("cpu"), 4, 0, feature_fn)
        assert torch.equal(got, expected) and torch.equal(got_labels, labels)
    student = build_pretrained_backbone("vit_tiny", 16, 32, str(full), checkpoint_key="student")
    assert not torch.equal(extract_features(student, data, torch.device("cpu"), 4, 0, feature_fn)[0], expected)


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_STL10",))


def cli_error(argv: list[str], capsys) -> str:
    """Run eval_stl10's main in-process; it must exit 2 with exactly one line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        eval_stl10.cli(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("eval_stl10.py: error: ")
    return err


def test_cli_refuses_wrong_architecture_pickles_and_missing_data_in_one_line(tmp_path, capsys, monkeypatch):
    mini_stl10(tmp_path / "data", train_per_class=2, test_per_class=1)
    weights = tmp_path / "vit_tiny.pth"
    torch.save(build_backbone("vit_tiny", 16, 32).state_dict(), weights)
    common = ["--data_path", str(tmp_path / "data"), "--resize", "40", "--crop", "32", "--num_workers", "0"]
    common += ["--output_dir", str(tmp_path / "out"), "--shots", "1", "--device", "cpu"]
    err = cli_error([*common, "--arch", "vit_small", "--pretrained_weights", str(weights)], capsys)
    assert "do not fit this architecture" in err and "shape mismatches" in err and "--arch" in err
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pth"
    torch.save({"teacher": Payload()}, evil)
    err = cli_error([*common, "--arch", "vit_tiny", "--pretrained_weights", str(evil)], capsys)
    assert "--trust_checkpoint" in err and not (tmp_path / "PWNED_BY_STL10").exists()
    err = cli_error([*common, "--data_path", str(tmp_path / "missing")], capsys)
    assert "--download" in err
    err = cli_error([*common, "--arch", "vit_tiny", "--shots", "1", "3"], capsys)
    assert "class" in err and "--shots" in err
    err = cli_error([*common, "--crop", "40"], capsys)
    assert "multiple of --patch_size" in err
    assert not (tmp_path / "out" / "stl10_results.json").exists()


# ----------------------------------------------------------------------------------------------- few-shot statistics


def test_episodes_have_exactly_k_per_class_and_are_seeded():
    labels = torch.arange(5).repeat_interleave(30)[torch.randperm(150, generator=torch.Generator().manual_seed(0))]
    for shots in (1, 5, 10):
        index = sample_episode(labels, shots, 5, seed=0, episode=0)
        assert index.shape == (5 * shots,) and index.unique().numel() == 5 * shots
        assert torch.equal(torch.bincount(labels[index], minlength=5), torch.full((5,), shots))
        assert torch.equal(index, sample_episode(labels, shots, 5, seed=0, episode=0))
    episodes = [sample_episode(labels, 5, 5, seed=0, episode=e) for e in range(4)]
    assert all(not torch.equal(a, b) for i, a in enumerate(episodes) for b in episodes[i + 1 :])
    assert not torch.equal(episodes[0], sample_episode(labels, 5, 5, seed=1, episode=0))
    with pytest.raises(ValueError, match="class .* fewer than 31 shots"):
        sample_episode(labels, 31, 5, seed=0, episode=0)


def test_confidence_interval_on_known_values():
    mean, half = confidence_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0
    assert half == pytest.approx(1.959964 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)  # 1.38590
    assert half == pytest.approx(1.3859, abs=1e-4)
    assert confidence_interval([7.0, 7.0, 7.0]) == (7.0, 0.0)
    assert math.isnan(confidence_interval([4.0])[1])
    summary = summarize_accuracies([80.0, 90.0])
    assert summary["mean"] == 85.0 and summary["std"] == pytest.approx(math.sqrt(50))
    assert summary["ci95"] == pytest.approx(1.959964 * math.sqrt(50) / math.sqrt(2), rel=1e-6)
    assert summarize_accuracies([50.0])["ci95"] is None


def test_few_shot_classifiers_on_known_features():
    # class c lives around direction e_c; the query [1, 1, 0] is nearest to class 0's mean but not to every sample
    support = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    assert nearest_mean_predict(support, torch.tensor([0, 0, 1, 1]), torch.tensor([[2.0, 0.1, 0.0]]), 2).item() == 0
    assert nearest_mean_predict(support, torch.tensor([0, 0, 1, 1]), torch.tensor([[0.1, 3.0, 0.0]]), 2).item() == 1
    torch.manual_seed(0)
    centres = torch.eye(4) * 10
    train_labels = torch.arange(4).repeat(10)
    test_labels = torch.arange(4).repeat(5)
    train = centres[train_labels] + torch.randn(40, 4)
    test = centres[test_labels] + torch.randn(20, 4)
    results = run_fewshot(train, train_labels, test, test_labels, [1, 3], episodes=2, num_classes=4)
    assert set(results) == {"1-NN", "k-NN", "class mean"}
    assert all(results[m][k] == [100.0, 100.0] for m in results for k in (1, 3))
    noise = run_fewshot(torch.randn(40, 8), train_labels, torch.randn(20, 8), test_labels, [2], 3, 4)
    assert all(0 <= a <= 100 for m in noise for a in noise[m][2]) and len(set(noise["1-NN"][2])) > 1


def test_linear_probe_matches_scikit_learn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)) + np.repeat(np.eye(3, 6) * 2.0, 40, axis=0)
    y = np.repeat(np.arange(3), 40)
    wd = 1e-2
    w, b = train_logistic_regression(torch.from_numpy(x), torch.from_numpy(y), 3, wd, max_iter=200)
    reference = LogisticRegression(C=1.0 / (wd * len(x)), tol=1e-10, max_iter=2000).fit(x, y)
    ours = torch.softmax(torch.from_numpy(x) @ w.T + b, dim=1).numpy()
    assert np.abs(ours - reference.predict_proba(x)).max() < 1e-4
    result = linear_probe(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(x), torch.from_numpy(y), 3)
    assert result.weight_decay in (1e-5, 1e-4, 1e-3, 1e-2) and len(result.holdout_top1) == 4
    assert result.top1 >= 85 and result.top5 == 100.0
    best = max(result.holdout_top1.values())
    assert result.weight_decay == max(wd for wd, acc in result.holdout_top1.items() if acc == best)


# ----------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_eval_stl10_end_to_end(tmp_path):
    data = mini_stl10(tmp_path / "stl10")
    out = tmp_path / "out"
    flags = ["--arch", "vit_tiny", "--patch_size", "16", "--resize", "72", "--crop", "64"]
    flags += ["--data_path", str(data), "--shots", "1", "2", "5", "--episodes", "3", "--nb_knn", "5", "20", "100"]
    flags += ["--batch_size_per_gpu", "16", "--num_workers", "1", "--device", "cpu", "--seed", "3"]
    result = run_script(["eval_stl10.py", *flags, "--output_dir", str(out), "--dump_features", str(tmp_path / "f")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "few-shot top-1" in result.stdout and "linear probe" in result.stdout

    results = json.loads((out / "stl10_results.json").read_text())
    assert results["data"]["train_images"] == 60 and results["data"]["test_images"] == 30
    assert results["data"]["classes"][:2] == ["airplane", "bird"]
    assert results["model"]["feature_dim"] == 192 and results["model"]["name"] == "vit_tiny/16 (random init)"
    knn = results["knn"]
    assert set(knn["variants"]) == {"weighted cosine", "uniform euclidean"} and knn["skipped"] == [100]
    assert all(
        0 <= knn["variants"][v][k]["top1"] <= knn["variants"][v][k]["top5"] <= 100
        for v in knn["variants"]
        for k in ("5", "20")
    )
    assert 0 <= results["linear"]["top1"] <= 100
    fewshot = results["fewshot"]
    assert fewshot["shots"] == [1, 2, 5] and set(fewshot["methods"]) == {"1-NN", "k-NN", "class mean"}
    for per_k in fewshot["methods"].values():
        for k in ("1", "2", "5"):
            stats = per_k[k]
            assert len(stats["accuracies"]) == 3
            assert all(a * 0.3 == pytest.approx(round(a * 0.3)) for a in stats["accuracies"])  # hits out of 30
            assert stats["mean"] == pytest.approx(np.mean(stats["accuracies"])) and stats["ci95"] >= 0
    # 1 shot: 1-NN, weighted k-NN over one sample per class and the class mean are the same classifier
    assert fewshot["methods"]["1-NN"]["1"]["accuracies"] == fewshot["methods"]["class mean"]["1"]["accuracies"]

    with Image.open(out / "stl10_fewshot.png") as png:
        assert png.format == "PNG" and png.size[0] >= 800 and png.size[1] >= 500
        assert len(png.convert("RGB").getcolors(1 << 20)) > 50  # a drawn figure, not a blank canvas

    # the dumped features evaluate again without the model or the images, to the same numbers
    again = eval_stl10.cli(
        [
            *flags,
            "--data_path",
            str(tmp_path / "none"),
            "--output_dir",
            str(tmp_path / "out2"),
            "--load_features",
            str(tmp_path / "f"),
        ]
    )
    assert again == 0
    reloaded = json.loads((tmp_path / "out2" / "stl10_results.json").read_text())
    assert reloaded["knn"] == knn and reloaded["fewshot"]["methods"] == fewshot["methods"]


@pytest.mark.slow
@pytest.mark.distributed
def test_eval_stl10_under_torchrun_gathers_the_same_features(tmp_path):
    data = mini_stl10(tmp_path / "stl10", train_per_class=3, test_per_class=1)
    flags = ["--arch", "vit_tiny", "--resize", "40", "--crop", "32", "--data_path", str(data), "--max_test", "7"]
    flags += ["--shots", "1", "2", "--episodes", "2", "--nb_knn", "3", "--num_workers", "0", "--device", "cpu"]
    flags += ["--batch_size_per_gpu", "4", "--pretrained_weights", str(tmp_path / "w.pth")]
    torch.manual_seed(0)
    torch.save(build_backbone("vit_tiny", 16, 32).state_dict(), tmp_path / "w.pth")
    assert eval_stl10.cli([*flags, "--output_dir", str(tmp_path / "one"), "--dump_features", str(tmp_path / "f1")]) == 0
    result = run_script(
        ["eval_stl10.py", *flags, "--output_dir", str(tmp_path / "two"), "--dump_features", str(tmp_path / "f2")],
        nproc=2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("few-shot top-1") == 1  # only rank 0 evaluates and reports
    for name in ("trainfeat.pth", "testfeat.pth", "trainlabels.pth", "testlabels.pth"):
        one, two = (
            torch.load(tmp_path / "f1" / name, weights_only=True),
            torch.load(tmp_path / "f2" / name, weights_only=True),
        )
        assert one.shape == two.shape and torch.allclose(one, two, atol=1e-5), name
    assert torch.load(tmp_path / "f2" / "testfeat.pth", weights_only=True).shape == (7, 192)
    one = json.loads((tmp_path / "one" / "stl10_results.json").read_text())
    two = json.loads((tmp_path / "two" / "stl10_results.json").read_text())
    assert one["data"] == two["data"] and one["knn"] == two["knn"]
