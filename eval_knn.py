"""k-NN evaluation of a frozen backbone: weighted (DINO) or uniform (scikit-learn style) nearest neighbours.

    python eval_knn.py --pretrained_weights runs/tiny/checkpoint.pth --checkpoint_key teacher --data_path DIR
    torchrun --nproc_per_node=4 eval_knn.py --pretrained_weights ... --nb_knn 10 20 100 200 --temperature 0.07
    python eval_knn.py ... --knn_metric euclidean --knn_weights uniform --nb_knn 5   # the original notebook's setup

Features are extracted in parallel (each process embeds its share of each split once) and gathered in dataset order.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from utils.data.augment.per_image import eval_transform
from utils.data.folders import build_image_dataset, has_labels
from utils.data.setup import prepare_data_path
from utils.eval.features import KNN_FEATURES, FeatureDump, extract_features
from utils.eval.knn import knn_classifier
from utils.model.weights import build_pretrained_backbone
from utils.runtime.cli import add_backbone_flags, add_data_flags, user_errors
from utils.runtime.distributed import cleanup, init_distributed_mode
from utils.runtime.errors import DatasetError, UsageError
from utils.runtime.monitoring import log

__all__ = ["knn_classifier", "get_args_parser", "main", "cli"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("k-NN evaluation", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_backbone_flags(parser)
    add_data_flags(parser)
    knn = parser.add_argument_group("k-NN")
    knn.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int, help="numbers of neighbours k")
    knn.add_argument("--temperature", default=0.07, type=float, help="temperature T of the exp(sim / T) vote weights")
    knn.add_argument(
        "--knn_metric",
        default="cosine",
        choices=["cosine", "euclidean"],
        help="cosine: L2-normalised features, dot product (DINO); euclidean: raw features (scikit-learn)",
    )
    knn.add_argument(
        "--knn_weights",
        default="distance",
        choices=["distance", "uniform"],
        help="distance: votes weighted by exp(similarity / T) (DINO); uniform: one vote per neighbour",
    )
    knn.add_argument(
        "--feature",
        default="cls",
        choices=sorted(KNN_FEATURES),
        help="cls: the normalised CLS token; patch_mean: the mean of the last block's patch tokens",
    )
    knn.add_argument(
        "--dump_features",
        default=None,
        type=str,
        help="save the features and labels to this folder (trainfeat.pth, testfeat.pth, trainlabels.pth, "
        "testlabels.pth)",
    )
    knn.add_argument(
        "--load_features",
        default=None,
        type=str,
        help="load features and labels from this folder instead of running the backbone",
    )
    knn.add_argument(
        "--features_on_device",
        action="store_true",
        help="keep the feature bank on the GPU for the k-NN (faster; needs memory)",
    )
    return parser


def validate_args(args: argparse.Namespace) -> None:
    if any(k <= 0 for k in args.nb_knn):
        raise UsageError(f"--nb_knn values must be positive (got {args.nb_knn})")
    if args.temperature <= 0:
        raise UsageError(f"--temperature must be positive (got {args.temperature})")


def compute_features(args, ctx) -> FeatureDump:
    """Train and val features ``[N, C]`` and labels of the frozen backbone, on every process."""
    data_path = prepare_data_path(args.dataset, args.data_path, args.download, is_main=ctx.is_main)
    transform = eval_transform(args.image_size)
    train = build_image_dataset(data_path, "train", transform=transform)
    val = build_image_dataset(data_path, "val", transform=transform)
    if val is None or not has_labels(train) or not has_labels(val):
        raise DatasetError(
            f"{data_path} needs labelled train/ and val/ splits (class sub-folders) for a k-NN evaluation"
        )
    model = build_pretrained_backbone(
        args.arch,
        args.patch_size,
        args.image_size,
        args.pretrained_weights,
        args.checkpoint_key,
        args.timm_model,
        args.trust_checkpoint,
    ).to(ctx.device)
    log(f"extracting features of {len(train)} train and {len(val)} val images on {ctx.world_size} process(es)")
    options = (ctx.device, args.batch_size_per_gpu, args.num_workers, KNN_FEATURES[args.feature])
    train_features, train_labels = extract_features(model, train, *options)
    test_features, test_labels = extract_features(model, val, *options)
    return FeatureDump(
        train_features=train_features, train_labels=train_labels, test_features=test_features, test_labels=test_labels
    )


def format_table(rows: list[dict]) -> str:
    lines = [f"{'k':>5}  {'top-1':>7}  {'top-5':>7}"]
    lines += [f"{r['k']:>5}  {r['top1']:>7.2f}  {r['top5']:>7.2f}" for r in rows]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> list[dict]:
    """The whole evaluation on parsed flags (the entry of the command line and of SLURM jobs): one
    ``{"k", "top1", "top5"}`` row per ``--nb_knn`` on the main process (appended to ``knn_results.json``), an empty
    list on the others. User mistakes raise a :class:`~utils.runtime.errors.UsageError` (or another user error)."""
    validate_args(args)
    ctx = init_distributed_mode(args.device)
    start = time.time()
    if args.load_features:
        dump = FeatureDump.load(args.load_features)
    else:
        dump = compute_features(args, ctx)
    train_features, test_features = dump.train_features, dump.test_features
    train_labels, test_labels = dump.train_labels, dump.test_labels
    rows: list[dict] = []
    if ctx.is_main:
        if args.dump_features:
            log(f"features saved to {dump.save(args.dump_features)}")
        device = ctx.device if args.features_on_device else torch.device("cpu")
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
        for k in args.nb_knn:
            top1, top5 = knn_classifier(
                train_features.to(device),
                train_labels.to(device),
                test_features.to(device),
                test_labels.to(device),
                min(k, len(train_labels)),
                args.temperature,
                num_classes,
                metric=args.knn_metric,
                weighting=args.knn_weights,
            )
            rows.append({"k": k, "top1": top1, "top5": top5})
        log(
            f"{args.knn_weights} {args.knn_metric} k-NN, T={args.temperature}, {len(train_labels)} train / "
            f"{len(test_labels)} val features of dimension {train_features.shape[1]}:\n{format_table(rows)}"
        )
        record = {
            "pretrained_weights": args.pretrained_weights,
            "checkpoint_key": args.checkpoint_key,
            "arch": args.arch,
            "metric": args.knn_metric,
            "weights": args.knn_weights,
            "temperature": args.temperature,
            "feature": args.feature,
            "results": rows,
            "time_s": round(time.time() - start, 2),
        }
        output = Path(args.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        with open(output / "knn_results.json", "a") as fh:
            fh.write(json.dumps(record) + "\n")
    cleanup()
    return rows


def cli(argv: list[str] | None = None) -> int:
    """The command line: parse ``argv``, run :func:`main`; a user mistake exits with status 2 and one line."""
    args = get_args_parser().parse_args(argv)
    with user_errors():
        main(args)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
