"""Quality of DINO features on real photos: the random-init backbone against the teacher a named recipe trains.

Prepares a Tiny-ImageNet-format zip or folder (or an ImageFolder root with ``train/`` and ``val/``) through the
project's own TinyImageNet code into a work folder outside ``--data``, pretrains with ``main_dino`` and a recipe from
``configs/<recipe>.args`` for a fixed number of iterations, then evaluates the random-init backbone and the trained
teacher the same way on frozen features of the eval transform (``--global_crop_size`` px centre crops):

* weighted k-NN of the CLS feature (cosine, k=20, votes ``exp(s / 0.07)``), as DINO's evaluation and the online k-NN;
* scikit-learn's ``KNeighborsClassifier(n_neighbors=5)`` (Euclidean, uniform votes) on the same feature, as the
  original notebook;
* the linear probe on cached features (the CLS tokens of the last 4 blocks, as DINO's ViT linear evaluation): one
  SGD classifier per learning rate of a grid, the best one's val top-1;
* the effective rank of the train split's CLS features.

``--peer`` trains the same budget (iterations, crops, batch, schedules) with a DINO loop built from lightly's public
blocks (``benchmarks/quality_peer.py``) and evaluates its teacher the same way. Extra arguments are ``main_dino.py``
flags that override the recipe's (ablations)::

    python benchmarks/bench_quality.py --data ../shared/data/tiny-imagenet-10.zip   # recipe photos_patch8
    python benchmarks/bench_quality.py --data ../shared/data/tiny-imagenet-10.zip --peer
    python benchmarks/bench_quality.py --data ../shared/data/tiny-imagenet-10.zip --recipe photos   # patch 16
    python benchmarks/bench_quality.py --data ../shared/data/tiny-imagenet-10.zip --recipe dino_official --iters 300
    python benchmarks/bench_quality.py --data ../shared/data/tiny-imagenet-10.zip --koleo_loss_weight 0.1

Writes ``<run>/quality.png`` (online k-NN top-1 and effective rank against iterations, from the run's ``log.txt``)
and ``<run>/quality.json``; the last line of stdout is the JSON report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import main_dino  # noqa: E402
from benchmarks.bench_common import emit_report  # noqa: E402
from utils.data.augment.per_image import eval_transform  # noqa: E402
from utils.data.folders import DatasetError, build_image_dataset  # noqa: E402
from utils.data.tinyimagenet import download_tiny_imagenet, relayout_tiny_imagenet_val  # noqa: E402
from utils.eval.features import effective_rank, extract_features  # noqa: E402
from utils.eval.knn import knn_classifier  # noqa: E402
from utils.eval.linear_probe import train_grid_on_features  # noqa: E402
from utils.model.vit import build_backbone  # noqa: E402
from utils.model.weights import load_backbone_weights  # noqa: E402
from utils.train.run import train_dino  # noqa: E402

CONFIG_DIR = REPO_ROOT / "configs"
#: Learning rates (at batch 256) of the linear-probe grid; the best head's val top-1 is reported.
LINEAR_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
#: CLS tokens of this many last blocks, concatenated, are the linear probe's input (DINO's ViT evaluation).
LINEAR_BLOCKS = 4
KNN_K, KNN_T, SKLEARN_K = 20, 0.07, 5
GAIN_METRICS = ("knn_top1", "knn_sklearn_top1", "linear_top1")
#: The smoke run: a few real images per class, tiny crops and head, two short epochs.
QUICK = {
    "train_per_class": 10,
    "val_per_class": 5,
    "linear_epochs": 10,
    "flags": [
        "--patch_size", "16", "--global_crop_size", "32", "--local_crop_size", "16", "--local_crops_number", "2",
        "--batch_size_per_gpu", "16", "--out_dim", "256", "--epochs", "2", "--num_workers", "0", "--print_freq", "1",
    ],
}  # fmt: skip


# ---- recipes ---------------------------------------------------------------------------------------------------------
def recipe_path(recipe: str) -> Path:
    """``configs/<recipe>.args``, or ``recipe`` itself when it is a path to a file."""
    path = Path(recipe)
    if path.suffix == ".args" or path.is_file():
        return path
    return CONFIG_DIR / f"{recipe}.args"


def read_recipe(recipe: str) -> list[str]:
    """The ``main_dino.py`` flags of a recipe file (shell words; ``#`` starts a comment)."""
    path = recipe_path(recipe)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.args")))
        raise SystemExit(f"bench_quality.py: error: no recipe {recipe!r} (known: {known}, or a path to an .args file)")
    return shlex.split(path.read_text(), comments=True)


def dino_args(flags: list[str]) -> argparse.Namespace:
    """``main_dino.py``'s parsed and validated flags."""
    args = main_dino.get_args_parser().parse_args(flags)
    main_dino.validate_args(args)
    return args


# ---- data ------------------------------------------------------------------------------------------------------------
def default_work_dir() -> Path:
    """``$XDG_CACHE_HOME/tinydino/bench_quality`` (``~/.cache/...`` when unset): per user, outside any dataset."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tinydino" / "bench_quality"


def _source_key(path: Path) -> str:
    """Short key of a source file or folder (absolute path, size, modification time)."""
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:10]


def prepare_data(data: Path, work_dir: Path) -> Path:
    """A folder with ``train/`` and ``val/`` in ImageFolder layout, read from ``data`` and never written into it.

    * a TinyImageNet-format zip is extracted and its val split re-laid out under ``work_dir/data/`` (once per zip);
    * a TinyImageNet-format folder whose val split is not yet in class folders is copied there and re-laid out;
    * a folder already in ImageFolder layout (``train/<class>/``, ``val/<class>/``) is used where it is.
    """
    data = Path(data).expanduser()
    if not data.exists():
        raise DatasetError(f"no dataset at {data}")
    target = work_dir / "data" / f"{data.stem}-{_source_key(data)}" / data.stem
    if data.is_file():
        # download_tiny_imagenet takes the zip <root name>.zip from the dataset root's parent folder
        link = target.parent / f"{target.name}.zip"
        target.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(data.resolve())
        return download_tiny_imagenet(target)
    if (data / "val" / "images").is_dir():
        if not (target / "train").is_dir():
            partial = target.with_name(target.name + ".copying")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(data, partial)
            os.replace(partial, target)
        relayout_tiny_imagenet_val(target)
        return target
    if (data / "train").is_dir() and (data / "val").is_dir():
        return data
    raise DatasetError(f"{data} is neither a TinyImageNet zip or folder nor a folder with train/ and val/")


def quick_subset(root: Path, out: Path, train_per_class: int, val_per_class: int) -> Path:
    """The first images (sorted by name) of every class of ``root``'s splits, copied to ``out/<split>/<class>/``
    (``out`` is emptied first)."""
    shutil.rmtree(out, ignore_errors=True)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        dataset = build_image_dataset(root, split)
        taken: dict[int, int] = {}
        for path, label in sorted(dataset.samples):
            if taken.get(label, 0) < count:
                dest = out / split / dataset.classes[label] / Path(path).name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
                taken[label] = taken.get(label, 0) + 1
    return out


# ---- evaluation ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalData:
    """The labelled splits, read with the evaluation transform."""

    train: object
    val: object
    num_classes: int

    @classmethod
    def from_root(cls, root: Path, image_size: int) -> EvalData:
        transform = eval_transform(image_size)
        train = build_image_dataset(root, "train", transform=transform)
        val = build_image_dataset(root, "val", transform=transform)
        return cls(train, val, len(train.classes))


def _features(backbone: torch.nn.Module, dataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, LINEAR_BLOCKS * C]`` features (CLS token of each of the last blocks, the last block's last) and labels."""

    return extract_features(backbone, dataset, device, batch_size=256, num_workers=0, feature_fn=last_cls_tokens)


def last_cls_tokens(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The CLS tokens of the last ``LINEAR_BLOCKS`` blocks (each through the final norm), oldest block first."""
    return torch.cat([tokens[:, 0] for tokens in model.get_intermediate_layers(images, LINEAR_BLOCKS)], dim=-1)


def sklearn_knn_top1(train: torch.Tensor, train_labels, val: torch.Tensor, val_labels, k: int = SKLEARN_K) -> float:
    """Top-1 (%) of scikit-learn's ``KNeighborsClassifier(n_neighbors=k)`` (Euclidean, uniform votes)."""
    from sklearn.neighbors import KNeighborsClassifier

    classifier = KNeighborsClassifier(n_neighbors=k).fit(train.numpy(), train_labels.numpy())
    return 100.0 * float((classifier.predict(val.numpy()) == val_labels.numpy()).mean())


def evaluate_backbone(backbone: torch.nn.Module, data: EvalData, device: torch.device, linear_epochs: int) -> dict:
    """k-NN (both ways), linear probe and effective rank of a frozen backbone (see the module docstring)."""
    backbone = backbone.to(device).eval()
    train, train_labels = _features(backbone, data.train, device)
    val, val_labels = _features(backbone, data.val, device)
    dim = train.shape[1] // LINEAR_BLOCKS
    cls_train, cls_val = train[:, -dim:], val[:, -dim:]  # the last block's CLS token: the backbone's output
    knn_top1, _ = knn_classifier(cls_train, train_labels, cls_val, val_labels, KNN_K, KNN_T, data.num_classes)
    linear = train_grid_on_features(
        train, train_labels, val, val_labels, list(LINEAR_LRS), linear_epochs, data.num_classes
    )
    return {
        "knn_top1": knn_top1,
        "knn_sklearn_top1": sklearn_knn_top1(cls_train, train_labels, cls_val, val_labels),
        "linear_top1": linear["best_top1"],
        "linear_best_lr": linear["best_lr"],
        "effective_rank": effective_rank(cls_train),
    }


def random_init_backbone(args: argparse.Namespace) -> torch.nn.Module:
    """The backbone ``main_dino`` starts from: built right after ``torch.manual_seed(--seed)``."""
    torch.manual_seed(args.seed)
    return build_backbone(args.arch, args.patch_size, args.global_crop_size, args.drop_path_rate)


def trained_backbone(args: argparse.Namespace, checkpoint: Path) -> torch.nn.Module:
    """The teacher backbone of a checkpoint (ours or the peer's: ``{"teacher": {"backbone.<key>": tensor}}``)."""
    backbone = build_backbone(args.arch, args.patch_size, args.global_crop_size)
    load_backbone_weights(backbone, str(checkpoint), "teacher")
    return backbone


def online_random_init_knn(checkpoint: Path) -> float | None:
    """The run's own k-NN top-1 of its random-init teacher (``knn_random_init`` in the checkpoint): it must equal
    this script's ``random_init`` row when the run started from the same weights."""
    knn = torch.load(checkpoint, map_location="cpu", weights_only=True).get("knn_random_init")
    return None if knn is None else knn["top1"]


# ---- pretraining -----------------------------------------------------------------------------------------------------
def iterations_per_epoch(root: Path, batch_size: int) -> int:
    return len(build_image_dataset(root, "train")) // batch_size


def read_log(output_dir: Path) -> list[dict]:
    """The run's ``log.txt`` records (one JSON object per epoch)."""
    path = output_dir / "log.txt"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def pretrain(args: argparse.Namespace) -> dict:
    """``main_dino``'s run; wall seconds (online k-NN included), training seconds and images/s (training only)."""
    start = time.perf_counter()
    train_dino(args)
    seconds = time.perf_counter() - start
    records = read_log(Path(args.output_dir))
    train_seconds = sum(r.get("train_epoch_time_s", 0.0) for r in records)
    images = args.max_iters * args.batch_size_per_gpu
    return {
        "seconds": seconds,
        "train_seconds": train_seconds,
        "images_per_s": images / train_seconds if train_seconds else None,
        "records": records,
    }


def learning_curve(records: list[dict], niter: int, iters: int, random_init: dict) -> list[dict]:
    """Online k-NN top-1 and effective rank against iterations and training minutes (random init at 0)."""
    curve = [
        {
            "iter": 0,
            "minutes": 0.0,
            "knn_top1": random_init["knn_top1"],
            "effective_rank": random_init["effective_rank"],
        }
    ]
    minutes = 0.0
    for record in records:
        minutes += record.get("train_epoch_time_s", 0.0) / 60
        if record.get("knn_top1") is not None:
            curve.append(
                {
                    "iter": min((record["epoch"] + 1) * niter, iters),
                    "minutes": minutes,
                    "knn_top1": record["knn_top1"],
                    "effective_rank": record.get("knn_feature_rank"),
                }
            )
    return curve


def plot_curve(curve: list[dict], title: str, path: Path) -> Path:
    """Two panels against iterations: online k-NN top-1 (%) and feature effective rank; minutes on a top axis;
    ``title`` (the recipe, its overrides and the iterations) above both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iters = [p["iter"] for p in curve]
    fig, (ax_knn, ax_rank) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_knn.plot(iters, [p["knn_top1"] for p in curve], "o-")
    ax_knn.axhline(curve[0]["knn_top1"], color="grey", ls="--", lw=1, label="random init")
    ax_knn.axhline(curve[0]["knn_top1"] + 10, color="tab:red", ls=":", lw=1, label="random init + 10")
    ax_knn.set(xlabel="iteration", ylabel="weighted k-NN top-1 (%)")
    fig.suptitle(title, fontsize=9, wrap=True)
    ax_knn.legend(loc="best", fontsize=8)
    ax_rank.plot(iters, [p["effective_rank"] for p in curve], "o-", color="tab:green")
    ax_rank.set(xlabel="iteration", ylabel="feature effective rank")
    if len(curve) > 1 and curve[-1]["minutes"] > 0:
        per_iter = curve[-1]["minutes"] / max(curve[-1]["iter"], 1)
        for ax in (ax_knn, ax_rank):
            top = ax.secondary_xaxis("top", functions=(lambda x: x * per_iter, lambda m: m / per_iter))
            top.set_xlabel("training minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- report ----------------------------------------------------------------------------------------------------------
def print_table(rows: dict[str, dict]) -> None:
    header = (
        f"{'backbone':<14}{'k-NN k=20':>10}{'sklearn k=5':>12}{'linear':>8}{'eff. rank':>10}{'train s':>9}{'img/s':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        secs = f"{r['train_seconds']:.0f}" if r.get("train_seconds") else "-"
        ips = f"{r['images_per_s']:.1f}" if r.get("images_per_s") else "-"
        print(
            f"{name:<14}{r['knn_top1']:>9.1f}%{r['knn_sklearn_top1']:>11.1f}%{r['linear_top1']:>7.1f}%"
            f"{r['effective_rank']:>10.1f}{secs:>9}{ips:>8}"
        )


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Any other argument is a main_dino.py flag that overrides the recipe's (e.g. --koleo_loss_weight 0.1).",
    )
    parser.add_argument("--data", required=True, help="Tiny-ImageNet-format zip or folder, or ImageFolder root")
    parser.add_argument("--recipe", default="photos_patch8", help="configs/<recipe>.args, or a path to an .args file")
    parser.add_argument("--iters", type=int, default=None, help="training iterations (default: the recipe's epochs)")
    parser.add_argument("--work_dir", default=None, help="prepared data, caches and runs (default: per-user cache)")
    parser.add_argument("--output_dir", default=None, help="the run's folder (default: a new one in --work_dir)")
    parser.add_argument("--peer", action="store_true", help="also train and evaluate the lightly-based DINO loop")
    parser.add_argument("--quick", action="store_true", help="a few iterations on a few images (the test suite's)")
    parser.add_argument("--linear_epochs", type=int, default=None, help="linear-probe epochs (default 100)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the JSON report to this file")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> dict:
    opts, overrides = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    work_dir = Path(opts.work_dir).expanduser() if opts.work_dir else default_work_dir()
    root = prepare_data(Path(opts.data), work_dir)
    if opts.quick:
        root = quick_subset(root, work_dir / "quick_data", QUICK["train_per_class"], QUICK["val_per_class"])
    flags = read_recipe(opts.recipe) + (QUICK["flags"] if opts.quick else []) + overrides
    probe = dino_args(flags)
    niter = iterations_per_epoch(root, probe.batch_size_per_gpu)
    iters = opts.iters or probe.epochs * niter
    epochs = math.ceil(iters / max(niter, 1))  # the schedules span the budget
    stamp = time.strftime("%Y%m%d-%H%M%S")
    output_dir = Path(opts.output_dir) if opts.output_dir else work_dir / "runs" / f"{Path(opts.recipe).stem}-{stamp}"
    flags += [
        "--data_path", str(root), "--output_dir", str(output_dir), "--cache_dir", str(work_dir / "image_cache"),
        "--epochs", str(epochs), "--max_iters", str(iters), "--knn_every", "1", "--saveckp_freq", "0",
    ]  # fmt: skip
    args = dino_args(flags)
    linear_epochs = opts.linear_epochs or (QUICK["linear_epochs"] if opts.quick else 100)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    data = EvalData.from_root(root, args.global_crop_size)

    rows = {"random_init": evaluate_backbone(random_init_backbone(args), data, device, linear_epochs)}
    run = pretrain(args)
    checkpoint = output_dir / "checkpoint.pth"
    rows["trained"] = evaluate_backbone(trained_backbone(args, checkpoint), data, device, linear_epochs)
    rows["trained"] |= {k: run[k] for k in ("seconds", "train_seconds", "images_per_s")}
    rows["trained"]["online_random_init_knn_top1"] = online_random_init_knn(checkpoint)
    curve = learning_curve(run["records"], niter, iters, rows["random_init"])
    title = " ".join([f"recipe {Path(opts.recipe).stem}", *overrides]) + f", {iters} iterations"
    plot_curve(curve, title, output_dir / "quality.png")
    if opts.peer:
        from benchmarks.quality_peer import train_peer

        peer = train_peer(args, root, iters, output_dir / "peer", device)
        rows["peer"] = evaluate_backbone(trained_backbone(args, peer["checkpoint"]), data, device, linear_epochs)
        rows["peer"] |= {k: peer[k] for k in ("seconds", "train_seconds", "images_per_s")}
        rows["peer"]["checkpoint"] = str(peer["checkpoint"])
    print_table(rows)
    report = {
        **rows,
        "gain": {
            k: rows["trained"][k] - rows["random_init"][k] for k in ("knn_top1", "knn_sklearn_top1", "linear_top1")
        },
        "recipe": Path(opts.recipe).stem,
        "flags": flags,
        "iters": iters,
        "epochs": epochs,
        "seconds": run["seconds"],
        "checkpoint": str(checkpoint),
        "curve": curve,
        "plot": str(output_dir / "quality.png"),
        "title": title,
        "data_root": str(root),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    (output_dir / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    return emit_report(report, opts.json)


if __name__ == "__main__":
    main()
