"""Linear probe: a single linear layer trained on the features of a frozen backbone.

    torchrun --nproc_per_node=4 eval_linear.py --pretrained_weights runs/tiny/checkpoint.pth --output_dir runs/linear
    python eval_linear.py --pretrained_weights ... --cache_features --lrs 0.001 0.01 0.1 1   # fast path, one pass

Default path (official): augmented images (RandomResizedCrop 0.6-1, flip) through the frozen backbone every epoch,
DDP on the linear layer, a checkpoint every epoch (a rerun resumes), validation top-1/top-5 every epoch.
``--cache_features``: features extracted once without augmentation, then one classifier per learning rate of
``--lrs`` trained in the same pass over the cached tensor; the best on validation is reported.

Features (:func:`feature_selector`): the CLS tokens of the last ``--n_last_blocks`` blocks, plus the last block's
mean patch token with ``--avgpool_patchtokens``. Both paths train with :func:`utils.eval.linear_probe.train_epoch`:
SGD (momentum 0.9, lr scaled by global batch / 256) or Adam(W), lr decayed per epoch by a cosine to 0. The frozen
backbone runs under ``--precision`` autocast; the classifier in fp32. ``log.txt`` gets one JSON line per epoch:
``train_loss`` (mean over steps and processes), ``train_lr``, and the validation ``test_acc1``/``test_acc5``/
``test_loss``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms

from utils.data.augment.per_image import eval_transform, normalize, to_rgb
from utils.data.folders import build_image_dataset, has_labels
from utils.data.setup import prepare_data_path
from utils.eval.features import StridedSampler, TokenFeatures, extract_features
from utils.eval.linear_probe import (
    build_grid,
    cosine_lr,
    scaled_lr,
    set_epoch_lrs,
    topk_correct,
    train_epoch,
    train_grid_on_features,
)
from utils.model.weights import build_pretrained_backbone
from utils.runtime.checkpoint import restart_from_checkpoint, save_checkpoint
from utils.runtime.cli import add_backbone_flags, add_data_flags, bool_flag, user_errors
from utils.runtime.distributed import all_reduce_sum, cleanup, init_distributed_mode
from utils.runtime.errors import DatasetError, UsageError
from utils.runtime.monitoring import ProgressMeter, TensorBoard, append_json_line, format_duration, log
from utils.train.optim import autocast, resolve_precision


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Linear probe", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_backbone_flags(parser)
    add_data_flags(parser)
    probe = parser.add_argument_group("linear probe")
    probe.add_argument(
        "--n_last_blocks",
        default=4,
        type=int,
        help="concatenate the CLS tokens of this many last blocks (4 for ViT-S, 1 for ViT-B officially)",
    )
    probe.add_argument(
        "--avgpool_patchtokens",
        default=False,
        type=bool_flag,
        help="also concatenate the average-pooled patch tokens of the last block",
    )
    probe.add_argument("--epochs", default=100, type=int, help="training epochs")
    probe.add_argument(
        "--lr",
        default=0.001,
        type=float,
        help="learning rate (SGD: at batch 256, scaled linearly by global batch / 256)",
    )
    probe.add_argument(
        "--optimizer",
        default="sgd",
        choices=["sgd", "adam", "adamw"],
        help="sgd: momentum 0.9 and cosine decay (official); adam/adamw: the original notebook's",
    )
    probe.add_argument("--weight_decay", default=0.0, type=float, help="weight decay of the linear layer")
    probe.add_argument("--val_freq", default=1, type=int, help="validate every this many epochs")
    probe.add_argument(
        "--cache_features",
        action="store_true",
        help="extract features once (no augmentation) and sweep --lrs in one pass over them",
    )
    probe.add_argument(
        "--lrs",
        default=None,
        nargs="+",
        type=float,
        help="learning rates swept with --cache_features (default: --lr alone)",
    )
    probe.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "fp16", "bf16"],
        help="autocast of the frozen backbone (the classifier trains in fp32); auto: as main_dino.py's --precision",
    )
    probe.add_argument("--print_freq", default=20, type=int, help="console progress every this many iterations")
    probe.add_argument("--seed", default=0, type=int, help="random seed")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    if args.epochs <= 0:
        raise UsageError(f"--epochs must be positive (got {args.epochs})")
    if args.n_last_blocks <= 0:
        raise UsageError(f"--n_last_blocks must be positive (got {args.n_last_blocks})")
    if args.lrs is not None and not args.cache_features:
        raise UsageError("--lrs sweeps learning rates over cached features: add --cache_features (or use --lr)")


def train_transform(image_size: int) -> transforms.Compose:
    """The original notebook's probe augmentation: RandomResizedCrop (scale 0.6-1, bicubic), horizontal flip."""
    bicubic = transforms.InterpolationMode.BICUBIC
    return transforms.Compose(
        [
            transforms.Lambda(to_rgb),
            transforms.RandomResizedCrop(image_size, scale=(0.6, 1.0), interpolation=bicubic),
            transforms.RandomHorizontalFlip(),
            normalize(),
        ]
    )


def load_splits(args, ctx, train_tf, val_tf):
    data_path = prepare_data_path(args.dataset, args.data_path, args.download, is_main=ctx.is_main)
    train = build_image_dataset(data_path, "train", transform=train_tf)
    val = build_image_dataset(data_path, "val", transform=val_tf)
    if val is None or not has_labels(train) or not has_labels(val):
        raise DatasetError(f"{data_path} needs labelled train/ and val/ splits (class sub-folders) for a linear probe")
    return train, val, len(train.classes)


def feature_selector(args: argparse.Namespace) -> TokenFeatures:
    """Official DINO's probe features: the CLS tokens of the last ``--n_last_blocks`` blocks, then, with
    ``--avgpool_patchtokens``, the mean patch token of the last block."""
    return TokenFeatures(n_last_blocks=args.n_last_blocks, avgpool_patchtokens=args.avgpool_patchtokens)


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def run_cached(args, ctx, backbone) -> dict:
    """Extract features once, then sweep the learning rates in one pass (rank 0 trains; features are small)."""
    train, val, num_classes = load_splits(args, ctx, eval_transform(args.image_size), eval_transform(args.image_size))
    start = time.time()
    precision = resolve_precision(args.precision, ctx.device)
    options = (ctx.device, args.batch_size_per_gpu, args.num_workers, feature_selector(args), autocast_dtype(precision))
    train_x, train_y = extract_features(backbone, train, *options)
    val_x, val_y = extract_features(backbone, val, *options)
    extract_s = time.time() - start
    log(f"cached features: {tuple(train_x.shape)} train, {tuple(val_x.shape)} val in {extract_s:.1f} s")
    if not ctx.is_main:
        return {}
    lrs = args.lrs or [args.lr]
    tb = TensorBoard(args.output_dir)

    def on_epoch(epoch: int, metrics: dict) -> None:
        best = max(metrics["top1"])
        log(f"Epoch [{epoch}/{args.epochs}]  train loss {metrics['train_loss']:.4f}  best val top-1 {best:.2f}%")
        append_json_line(
            Path(args.output_dir) / "log.txt",
            {
                "epoch": epoch,
                "train_loss": metrics["train_loss"],
                "test_acc1": best,
                "test_acc1_per_lr": dict(zip(map(str, lrs), metrics["top1"])),
            },
        )
        tb.scalars({f"val/top1_lr{lr:g}": acc for lr, acc in zip(lrs, metrics["top1"])}, epoch)

    device = ctx.device
    result = train_grid_on_features(
        train_x.to(device),
        train_y.to(device),
        val_x.to(device),
        val_y.to(device),
        lrs,
        args.epochs,
        num_classes,
        args.batch_size_per_gpu,
        args.optimizer,
        args.weight_decay,
        args.seed,
        on_epoch,
    )
    tb.close()
    best = result["grid"].heads[result["best_index"]]
    save_checkpoint(
        {"state_dict": best.state_dict(), "lr": result["best_lr"], "best_acc": result["best_top1"]},
        Path(args.output_dir) / "linear_best.pth",
    )
    log(
        "lr        top-1    top-5\n"
        + "\n".join(f"{lr:<8g}  {t1:6.2f}   {t5:6.2f}" for lr, t1, t5 in zip(lrs, result["top1"], result["top5"]))
    )
    return {
        "mode": "cached",
        "best_lr": result["best_lr"],
        "best_acc": result["best_top1"],
        "best_acc5": result["best_top5"],
        "per_lr": dict(zip(map(str, lrs), result["top1"])),
        "extract_time_s": extract_s,
        "time_s": time.time() - start,
    }


def frozen_features(backbone, selector: TokenFeatures, loader, device, precision: str):
    """``(features [B, D] fp32, labels [B])`` of each batch of ``loader``: the frozen backbone without gradient,
    under ``precision`` autocast."""
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.no_grad(), autocast(device, precision):
            features = selector(backbone, images)
        yield features.float(), labels


def progress(meter: ProgressMeter, images_per_step: int, lr: float) -> Callable[[int, torch.Tensor], None]:
    """``on_step`` for :func:`~utils.eval.linear_probe.train_epoch`: counts every step, reads the loss back to the
    host only on the steps the meter prints."""

    def on_step(step: int, loss: torch.Tensor) -> None:
        printing = step % meter.print_freq == 0 or step == meter.total
        meter.update(images_per_step, **({"loss": loss.item(), "lr": lr} if printing else {}))

    return on_step


@torch.no_grad()
def validate(backbone, classifier, loader, ctx, args, precision: str) -> dict:
    """Top-1 / top-5 (%) and mean loss over the whole val split, each process scoring its share."""
    totals = torch.zeros(4, device=ctx.device)  # correct@1, correct@5, loss sum, count
    for features, labels in frozen_features(backbone, feature_selector(args), loader, ctx.device, precision):
        logits = classifier(features)[0]
        c1, c5 = topk_correct(logits, labels)
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        totals += torch.stack([c1.float(), c5.float(), loss, torch.tensor(float(len(labels)), device=ctx.device)])
    c1, c5, loss, n = all_reduce_sum(totals).tolist()
    return {"acc1": 100.0 * c1 / n, "acc5": 100.0 * c5 / n, "loss": loss / n}


def run_augmented(args, ctx, backbone) -> dict:
    """The official path: augmented images through the frozen backbone every epoch, checkpoints, resume.

    One linear head (a :class:`~utils.eval.linear_probe.LinearClassifierGrid` of one, DDP across processes) trained
    by :func:`~utils.eval.linear_probe.train_epoch`; the lr of epoch ``e`` is
    :func:`~utils.eval.linear_probe.cosine_lr` of ``e`` and ``--epochs``, so a run resumed with more epochs follows
    the longer schedule. ``checkpoint.pth`` holds the head's ``state_dict`` (``linear.weight``, ``linear.bias``),
    the optimizer, the next ``epoch`` and ``best_acc``.
    """
    train, val, num_classes = load_splits(args, ctx, train_transform(args.image_size), eval_transform(args.image_size))
    sampler = DistributedSampler(train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=args.seed)
    pin = ctx.device.type == "cuda"
    train_loader = DataLoader(
        train,
        sampler=sampler,
        batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers,
        pin_memory=pin,
        drop_last=False,
    )
    val_loader = DataLoader(
        val,
        sampler=StridedSampler(len(val), ctx.rank, ctx.world_size),
        batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers,
        pin_memory=pin,
    )
    precision = resolve_precision(args.precision, ctx.device)
    selector = feature_selector(args)
    base_lr = scaled_lr(args.lr, args.batch_size_per_gpu * ctx.world_size, args.optimizer)
    grid, optimizer = build_grid(
        selector.dim(backbone.embed_dim), num_classes, [base_lr], args.optimizer, args.weight_decay, ctx.device
    )
    head = grid.heads[0]
    classifier = grid
    if ctx.world_size > 1:
        classifier = DistributedDataParallel(grid, device_ids=[ctx.device.index] if pin else None)

    output = Path(args.output_dir)
    run = {"epoch": 0, "best_acc": 0.0}
    if restart_from_checkpoint(output / "checkpoint.pth", run, state_dict=head, optimizer=optimizer):
        log(f"resumed the linear probe at epoch {run['epoch']} (best top-1 so far {run['best_acc']:.2f}%)")
    tb = TensorBoard(output)
    start = time.time()
    for epoch in range(run["epoch"], args.epochs):
        sampler.set_epoch(epoch)
        set_epoch_lrs(optimizer, [base_lr], epoch, args.epochs)
        lr = cosine_lr(base_lr, epoch, args.epochs)
        classifier.train()
        meter = ProgressMeter(len(train_loader), f"Epoch [{epoch}/{args.epochs}]", ctx.device, args.print_freq)
        on_step = progress(meter, args.batch_size_per_gpu * ctx.world_size, lr)
        batches = frozen_features(backbone, selector, train_loader, ctx.device, precision)
        train_loss = (all_reduce_sum(train_epoch(classifier, optimizer, batches, on_step)) / ctx.world_size).item()
        record = {"epoch": epoch, "train_loss": train_loss, "train_lr": lr}
        if (epoch + 1) % args.val_freq == 0 or epoch + 1 == args.epochs:
            classifier.eval()
            stats = validate(backbone, grid, val_loader, ctx, args, precision)
            run["best_acc"] = max(run["best_acc"], stats["acc1"])
            record |= {"test_acc1": stats["acc1"], "test_acc5": stats["acc5"], "test_loss": stats["loss"]}
            log(f"val top-1 {stats['acc1']:.2f}%  top-5 {stats['acc5']:.2f}%  (best top-1 {run['best_acc']:.2f}%)")
        tb.scalars({k: v for k, v in record.items() if k != "epoch"}, epoch)
        append_json_line(output / "log.txt", record)
        if ctx.is_main:
            save_checkpoint(
                {
                    "state_dict": head.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "best_acc": run["best_acc"],
                },
                output / "checkpoint.pth",
            )
    tb.close()
    log(f"linear probe done in {format_duration(time.time() - start)}: best val top-1 {run['best_acc']:.2f}%")
    return {"mode": "augmented", "best_acc": run["best_acc"], "time_s": time.time() - start}


def main(args: argparse.Namespace) -> dict:
    """The whole probe on parsed flags (the entry of the command line and of SLURM jobs); returns the result that
    ``linear_results.json`` gets (empty on the non-main processes of the cached path). User mistakes raise
    :class:`~utils.runtime.errors.UsageError` (or another error of ``user_error_types``)."""
    validate_args(args)
    ctx = init_distributed_mode(args.device)
    torch.manual_seed(args.seed)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    backbone = (
        build_pretrained_backbone(
            args.arch,
            args.patch_size,
            args.image_size,
            args.pretrained_weights,
            args.checkpoint_key,
            args.timm_model,
            args.trust_checkpoint,
        )
        .to(ctx.device)
        .eval()
    )
    for p in backbone.parameters():
        p.requires_grad_(False)
    result = run_cached(args, ctx, backbone) if args.cache_features else run_augmented(args, ctx, backbone)
    if ctx.is_main:
        with open(Path(args.output_dir) / "linear_results.json", "a") as fh:
            fh.write(json.dumps({"pretrained_weights": args.pretrained_weights, **result}) + "\n")
    cleanup()
    return result


def cli(argv: list[str] | None = None) -> int:
    """The command line: parse ``argv``, run :func:`main`; a user mistake exits with status 2 and one line."""
    args = get_args_parser().parse_args(argv)
    with user_errors():
        main(args)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
