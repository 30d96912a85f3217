"""Transfer of a (DINO) ViT's frozen features to STL-10: k-NN, linear probe and few-shot evaluations.

    python eval_stl10.py --arch vit_small --patch_size 16 --pretrained_weights dino_deitsmall16_pretrain.pth \\
        --data_path data/stl10 --download --output_dir runs/stl10_vits16
    torchrun --nproc_per_node=4 eval_stl10.py --timm_model vit_small_patch16_224.dino --data_path data/stl10

Features (CLS token or mean patch token, of the last ``--n_last_blocks`` blocks) of the STL-10 train (5000) and test
(8000) images, resized to ``--resize`` and centre-cropped to ``--crop`` as in the original notebook, are extracted
once (split over the processes under torchrun, then gathered); the main process then runs

* weighted k-NN (cosine, ``exp(s / T)`` votes, DINO's ``eval_knn.py``) and uniform Euclidean k-NN, for each
  ``--nb_knn``;
* a logistic-regression linear probe on the cached features (see :mod:`utils.eval.fewshot`);
* few-shot: ``--episodes`` seeded draws of ``K`` labelled train images per class for each ``K`` in ``--shots``,
  classified by 1-NN, weighted k-NN and nearest class mean, reported as mean ± 95 % confidence interval;

and writes ``<output_dir>/stl10_results.json`` and the plot ``<output_dir>/stl10_fewshot.png``.
Flags follow the official facebookresearch/dino ``eval_knn.py`` where the concept is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from utils.data.stl10 import STL10_CLASSES, STL10Binary, download_stl10, stl10_transform
from utils.eval.features import FeatureDump, TokenFeatures, extract_features
from utils.eval.fewshot import (
    FEWSHOT_METHODS,
    format_report,
    linear_probe,
    plot_fewshot,
    run_fewshot,
    subsample_indices,
    summarize_accuracies,
)
from utils.eval.knn import knn_classifier
from utils.model.weights import build_pretrained_backbone
from utils.runtime.cli import add_backbone_flags, bool_flag, default_loader_workers, user_errors
from utils.runtime.distributed import barrier, cleanup, init_distributed_mode
from utils.runtime.errors import UsageError
from utils.runtime.monitoring import format_duration, log

#: (name in the report, metric, weighting) of the k-NN variants run for every ``--nb_knn``.
KNN_VARIANTS = (("weighted cosine", "cosine", "distance"), ("uniform euclidean", "euclidean", "uniform"))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "STL-10 transfer evaluation",
        add_help=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        conflict_handler="resolve",  # --crop takes over the shared --image_size
    )
    add_backbone_flags(parser)
    parser.set_defaults(arch="vit_small")
    model = parser.add_argument_group("features")
    model.add_argument(
        "--use_cls", default=True, type=bool_flag, help="features: the CLS token (True) or the mean patch token"
    )
    model.add_argument(
        "--n_last_blocks",
        default=1,
        type=int,
        help="concatenate the CLS (or mean patch) tokens of the last n blocks (feature size n x embed dim)",
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--data_path", default="data/stl10", type=str, help="folder holding stl10_binary/ (train/test *.bin files)"
    )
    data.add_argument("--download", action="store_true", help="download (2.5 GB) and extract STL-10 into --data_path")
    data.add_argument("--resize", default=256, type=int, help="resize the shorter side to this (bicubic) ...")
    data.add_argument(
        "--crop",
        "--image_size",
        dest="crop",
        default=224,
        type=int,
        help="... then centre-crop this: the side of the model's input image (replaces the backbone group's "
        "--image_size, of the same meaning)",
    )
    data.add_argument(
        "--max_train", default=None, type=int, help="use a seeded random subset of this many train images (quick runs)"
    )
    data.add_argument(
        "--max_test", default=None, type=int, help="use a seeded random subset of this many test images (quick runs)"
    )
    data.add_argument("--batch_size_per_gpu", default=128, type=int, help="images per process and batch")
    data.add_argument(
        "--num_workers", default=default_loader_workers(), type=int, help="data loading workers per process"
    )
    data.add_argument(
        "--dump_features",
        default=None,
        type=str,
        help="save the extracted features and labels in this folder (trainfeat.pth, testfeat.pth, ...)",
    )
    data.add_argument(
        "--load_features",
        default=None,
        type=str,
        help="evaluate the features saved by --dump_features in this folder instead of extracting them",
    )

    evals = parser.add_argument_group("evaluations")
    evals.add_argument(
        "--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int, help="numbers of nearest neighbours (k-NN)"
    )
    evals.add_argument("--temperature", default=0.07, type=float, help="temperature of the weighted k-NN votes")
    evals.add_argument(
        "--linear_wd",
        default=[1e-5, 1e-4, 1e-3, 1e-2],
        nargs="+",
        type=float,
        help="weight decay candidates of the logistic-regression probe (picked on a 20%% hold-out of train)",
    )
    evals.add_argument("--linear_iters", default=500, type=int, help="maximum L-BFGS iterations of the linear probe")
    evals.add_argument("--shots", default=[1, 5, 10], nargs="+", type=int, help="few-shot: labelled images per class")
    evals.add_argument("--episodes", default=10, type=int, help="few-shot: random draws of the labelled images per K")
    evals.add_argument(
        "--fewshot_knn_k", default=20, type=int, help="few-shot weighted k-NN uses k = min(this, K x classes)"
    )
    evals.add_argument("--seed", default=0, type=int, help="seed of the few-shot draws, hold-out split and subsets")

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", default="runs/stl10", type=str, help="where the results JSON and plot go")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
    run.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "fp16", "bf16"],
        help="autocast precision of the feature extraction (features are stored in fp32)",
    )
    run.add_argument(
        "--dist_timeout",
        default=1800,
        type=float,
        help="seconds a process waits for the others (e.g. while rank 0 downloads) before failing",
    )
    run.add_argument("-h", "--help", action="help", help="show this help and exit")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Out-of-range flags are user mistakes: one line, before anything is computed."""
    problems = []
    positive = ("patch_size", "resize", "crop", "batch_size_per_gpu", "n_last_blocks", "episodes", "linear_iters")
    problems += [
        f"--{name} must be positive (got {getattr(args, name)})" for name in positive if getattr(args, name) < 1
    ]
    for name in ("max_train", "max_test"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            problems.append(f"--{name} must be positive (got {getattr(args, name)})")
    if not args.timm_model and args.crop % args.patch_size:
        problems.append(f"--crop ({args.crop}) must be a multiple of --patch_size ({args.patch_size})")
    if any(k < 1 for k in args.nb_knn):
        problems.append(f"--nb_knn values must be positive (got {args.nb_knn})")
    if any(k < 1 for k in args.shots):
        problems.append(f"--shots values must be positive (got {args.shots})")
    if not args.temperature > 0:
        problems.append(f"--temperature must be positive (got {args.temperature})")
    if any(not wd >= 0 for wd in args.linear_wd):
        problems.append(f"--linear_wd values must be >= 0 (got {args.linear_wd})")
    if args.fewshot_knn_k < 1:
        problems.append(f"--fewshot_knn_k must be positive (got {args.fewshot_knn_k})")
    if args.num_workers < 0:
        problems.append(f"--num_workers must be >= 0 (got {args.num_workers})")
    if args.load_features and args.dump_features:
        problems.append("--load_features and --dump_features exclude each other")
    if problems:
        raise UsageError("; ".join(problems))


def model_name(args: argparse.Namespace) -> str:
    """What the title of the plot calls the evaluated model."""
    if args.timm_model:
        return args.timm_model
    base = f"{args.arch}/{args.patch_size}"
    if args.load_features:
        return f"{base} (features from {Path(args.load_features).name})"
    if args.pretrained_weights:
        return f"{base} ({Path(args.pretrained_weights).name})"
    return f"{base} (random init)"


def subset(dataset: STL10Binary, max_n: int | None, seed: int) -> tuple[torch.utils.data.Dataset, list[int]]:
    """``dataset`` or a seeded random subset of it, and the labels of what is kept."""
    index = subsample_indices(len(dataset), max_n, seed)
    if index is None:
        return dataset, list(dataset.targets)
    return Subset(dataset, index.tolist()), [dataset.targets[i] for i in index.tolist()]


def check_shots(labels: list[int], num_classes: int, shots: list[int]) -> None:
    """Every class must have at least max(shots) training images (checked before the costly extraction)."""
    counts = torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=num_classes)
    if shots and int(counts.min()) < max(shots):
        c = int(counts.argmin())
        raise UsageError(
            f"few-shot needs {max(shots)} training images per class but class {c} has {int(counts[c])}: "
            "lower --shots or raise --max_train"
        )


def feature_selector(args: argparse.Namespace) -> TokenFeatures:
    """``--use_cls`` / ``--n_last_blocks``: per block of the last n, the CLS token or the mean patch token."""
    return TokenFeatures(n_last_blocks=args.n_last_blocks, use_cls=args.use_cls)


def extract(args: argparse.Namespace, ctx) -> tuple[torch.Tensor, ...]:
    """(train features, train labels, test features, test labels, class names), extracted from the images."""
    data_path = Path(args.data_path)
    if args.download:
        if ctx.is_main:
            download_stl10(data_path)
        barrier()
    transform = stl10_transform(args.resize, args.crop)
    train_set = STL10Binary(data_path, "train", transform=transform)
    test_set = STL10Binary(data_path, "test", transform=transform)
    classes = train_set.classes
    train_data, train_targets = subset(train_set, args.max_train, args.seed)
    test_data, _ = subset(test_set, args.max_test, args.seed + 1)
    check_shots(train_targets, len(classes), args.shots)
    log(f"data: {len(train_data)} train / {len(test_data)} test images of {len(classes)} classes from {data_path}")

    model = build_pretrained_backbone(
        args.arch,
        args.patch_size,
        args.crop,
        pretrained_weights=args.pretrained_weights or None,
        checkpoint_key=args.checkpoint_key,
        timm_model=args.timm_model,
        trust=args.trust_checkpoint,
    )
    patch = model.patch_embed.patch_size[0]
    if args.crop % patch:
        raise UsageError(f"--crop ({args.crop}) must be a multiple of the model's patch size ({patch})")
    if args.n_last_blocks > len(model.blocks):
        raise UsageError(f"--n_last_blocks ({args.n_last_blocks}) exceeds the model's {len(model.blocks)} blocks")
    model = model.to(ctx.device).eval()
    source = args.timm_model or args.pretrained_weights or "random initialisation"
    feature_fn = feature_selector(args)
    log(f"model: {model_name(args)}, weights from {source}, {feature_fn.describe()}")

    autocast = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    features = []
    for name, data in (("train", train_data), ("test", test_data)):
        start = time.time()
        feats, labels = extract_features(
            model, data, ctx.device, args.batch_size_per_gpu, args.num_workers, feature_fn, autocast
        )
        log(f"features of {len(data)} {name} images: {list(feats.shape)} in {format_duration(time.time() - start)}")
        features += [feats, labels]
    train_feats, train_labels, test_feats, test_labels = features
    dump = FeatureDump(
        train_features=train_feats, train_labels=train_labels, test_features=test_feats, test_labels=test_labels
    )
    if args.dump_features and ctx.is_main:
        log(f"features saved in {dump.save(args.dump_features)}")
    return (*features, classes)


def load_features(folder: str) -> tuple:
    """Features saved by ``--dump_features`` (tensors only: loaded with ``weights_only``) and the class names."""
    dump = FeatureDump.load(folder)
    num_classes = int(max(dump.train_labels.max(), dump.test_labels.max())) + 1
    classes = list(STL10_CLASSES) if num_classes <= len(STL10_CLASSES) else [str(c) for c in range(num_classes)]
    log(
        f"loaded features from {folder}: train {list(dump.train_features.shape)}, test {list(dump.test_features.shape)}"
    )
    return dump.train_features, dump.train_labels, dump.test_features, dump.test_labels, classes


def evaluate(args, train_feats, train_labels, test_feats, test_labels, classes, device) -> dict:
    """All evaluations on the gathered features; returns the results dict (what the JSON holds)."""
    num_classes = len(classes)
    timing = {}
    train_dev, test_dev = train_feats.to(device), test_feats.to(device)
    train_labels_dev, test_labels_dev = train_labels.to(device), test_labels.to(device)

    start = time.time()
    knn = {"temperature": args.temperature, "variants": {name: {} for name, _, _ in KNN_VARIANTS}, "skipped": []}
    for k in args.nb_knn:
        if k > len(train_feats):
            knn["skipped"].append(k)
            continue
        for name, metric, weighting in KNN_VARIANTS:
            top1, top5 = knn_classifier(
                train_dev,
                train_labels_dev,
                test_dev,
                test_labels_dev,
                k,
                args.temperature,
                num_classes,
                metric=metric,
                weighting=weighting,
            )
            knn["variants"][name][str(k)] = {"top1": top1, "top5": top5}
    timing["knn"] = time.time() - start

    start = time.time()
    linear = linear_probe(
        train_feats,
        train_labels,
        test_feats,
        test_labels,
        num_classes,
        args.linear_wd,
        max_iter=args.linear_iters,
        seed=args.seed,
        device=device,
    ).as_dict()
    timing["linear"] = time.time() - start

    start = time.time()
    shots = sorted(set(args.shots))
    accuracies = run_fewshot(
        train_feats,
        train_labels,
        test_feats,
        test_labels,
        shots,
        args.episodes,
        num_classes,
        seed=args.seed,
        temperature=args.temperature,
        knn_k=args.fewshot_knn_k,
        device=device,
    )
    fewshot = {
        "shots": shots,
        "episodes": args.episodes,
        "seed": args.seed,
        "knn_k": args.fewshot_knn_k,
        "temperature": args.temperature,
        "confidence_interval": "mean ± 1.96 · sample std (ddof=1) / sqrt(episodes) (normal approximation)",
        "methods": {m: {str(k): summarize_accuracies(accuracies[m][k]) for k in shots} for m in FEWSHOT_METHODS},
    }
    timing["fewshot"] = time.time() - start
    return {"knn": knn, "linear": linear, "fewshot": fewshot, "timing_s": timing}


def write_json(path: Path, record: dict) -> None:
    """Write ``record`` as JSON atomically (a temporary file renamed into place)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def plot(results: dict, path: Path, args: argparse.Namespace) -> Path:
    fewshot, n_train = results["fewshot"], results["data"]["train_images"]
    references = {f"linear probe, all {n_train} labels": results["linear"]["top1"]}
    weighted = results["knn"]["variants"]["weighted cosine"]
    if weighted:
        k = "20" if "20" in weighted else next(iter(weighted))
        references[f"weighted {k}-NN, all {n_train} labels"] = weighted[k]["top1"]
    subtitle = (
        f"{results['model']['feature']} features at {args.crop} px · {results['data']['test_images']} test images · "
        f"mean ± 95% CI over {fewshot['episodes']} episodes"
    )
    return plot_fewshot(
        fewshot["methods"],
        fewshot["shots"],
        path,
        title=f"STL-10 few-shot: {results['model']['name']}",
        subtitle=subtitle,
        references=references,
        chance=100.0 / len(results["data"]["classes"]),
        method_labels={
            "k-NN": f"weighted k-NN, k = min({fewshot['knn_k']}, {len(results['data']['classes'])}·K)",
            "class mean": "nearest class mean",
        },
    )


def main(args: argparse.Namespace) -> dict | None:
    """The whole evaluation on parsed flags (the entry of the command line and of SLURM jobs); returns the results
    on the main process, None on the others. User mistakes raise :class:`~utils.runtime.errors.UsageError` (or another
    user error)."""
    validate_args(args)
    ctx = init_distributed_mode(args.device, timeout_s=args.dist_timeout)
    torch.manual_seed(args.seed)
    start = time.time()
    if args.load_features:
        data = load_features(args.load_features) if ctx.is_main else None
    else:
        data = extract(args, ctx)
    extraction_s = time.time() - start
    if not ctx.is_main:  # features are gathered on every process; only the main one evaluates and writes
        cleanup()
        return None
    train_feats, train_labels, test_feats, test_labels, classes = data
    if train_feats.shape[1] != test_feats.shape[1] or len(train_feats) != len(train_labels):
        raise UsageError("train and test features do not match (feature size or label count)")
    check_shots(train_labels.tolist(), len(classes), args.shots)

    results = {
        "model": {
            "name": model_name(args),
            "arch": args.arch,
            "patch_size": args.patch_size,
            "pretrained_weights": args.pretrained_weights or None,
            "checkpoint_key": args.checkpoint_key,
            "timm_model": args.timm_model,
            "feature": feature_selector(args).describe(),
            "use_cls": args.use_cls,
            "n_last_blocks": args.n_last_blocks,
            "feature_dim": int(train_feats.shape[1]),
        },
        "data": {
            "data_path": args.data_path,
            "train_images": len(train_feats),
            "test_images": len(test_feats),
            "classes": list(classes),
            "resize": args.resize,
            "crop": args.crop,
        },
    }
    results |= evaluate(args, train_feats, train_labels, test_feats, test_labels, classes, ctx.device)
    results["timing_s"]["features"] = extraction_s
    results["args"] = vars(args)
    log(format_report(results))

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "stl10_results.json"
    write_json(json_path, results)
    png_path = plot(results, output_dir / "stl10_fewshot.png", args)
    total = sum(results["timing_s"].values())
    log(f"results: {json_path}  plot: {png_path}  (total {format_duration(total)})")
    cleanup()
    return results


def cli(argv: list[str] | None = None) -> int:
    """The command line: parse ``argv``, run :func:`main`; a user mistake exits with status 2 and one line."""
    parser = argparse.ArgumentParser(
        "eval_stl10.py",
        parents=[get_args_parser()],
        add_help=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    args = parser.parse_args(argv)
    with user_errors("eval_stl10.py"):
        main(args)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
