"""DINO self-supervised pretraining of a Vision Transformer.

    python main_dino.py --dataset synthetic --output_dir runs/quickstart          # one CPU or GPU
    torchrun --nproc_per_node=4 main_dino.py --data_path data/tiny-imagenet-200   # several GPUs (DDP)

Flags follow the official facebookresearch/dino ``main_dino.py`` where the concept is the same; defaults follow the
original TinyImageNet notebook (ViT-Tiny, 128 px global crops, 2 + 2 crops, lr 1e-4, wd 1e-6).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from utils import cosine_scheduler
from utils.augment import DataAugmentationDINO, eval_transform
from utils.checkpoint import restart_from_checkpoint, save_checkpoint
from utils.cli import UsageError, bool_flag, user_errors
from utils.data_setup import prepare_data_path
from utils.datasets import build_image_dataset, has_labels
from utils.distributed import cleanup, init_distributed_mode
from utils.knn_online import evaluate_knn
from utils.loss import DINOLoss
from utils.models import ARCH_ALIASES, build_dino_models, count_parameters
from utils.monitoring import TensorBoard, append_json_line, flags_as_markdown, format_duration, log
from utils.optim import build_grad_scaler, build_optimizer, get_params_groups, resolve_precision
from utils.schedules import teacher_momentum_schedule
from utils.training import DINOState, train_one_epoch

__all__ = ["DINOLoss", "get_args_parser", "main", "train_dino"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "DINO pretraining", add_help=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--arch",
        default="vit_tiny",
        type=str,
        help=f"{', '.join(ARCH_ALIASES)} (timm's vit_*_patch{{P}}_224), or any timm ViT name",
    )
    model.add_argument("--patch_size", default=16, type=int, help="ViT patch size in pixels (for the short arch names)")
    model.add_argument("--out_dim", default=65536, type=int, help="dimensionality of the DINO head's output")
    model.add_argument(
        "--norm_last_layer",
        default=True,
        type=bool_flag,
        help="freeze the weight norm of the head's last layer at 1 (more stable; False for better ViT-S)",
    )
    model.add_argument(
        "--momentum_teacher",
        default=0.996,
        type=float,
        help="base EMA momentum of the teacher, raised to 1 by a cosine schedule",
    )
    model.add_argument("--use_bn_in_head", default=False, type=bool_flag, help="batch norm in the projection head")
    model.add_argument("--drop_path_rate", default=0.1, type=float, help="stochastic depth rate of the student")

    temp = parser.add_argument_group("temperatures")
    temp.add_argument("--warmup_teacher_temp", default=0.04, type=float, help="teacher temperature at epoch 0")
    temp.add_argument("--teacher_temp", default=0.04, type=float, help="teacher temperature after the warmup")
    temp.add_argument(
        "--warmup_teacher_temp_epochs", default=0, type=int, help="epochs of linear teacher-temperature warmup"
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "fp16", "bf16"],
        help="auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU",
    )
    optim.add_argument("--weight_decay", default=1e-6, type=float, help="initial weight decay")
    optim.add_argument(
        "--weight_decay_end",
        default=None,
        type=float,
        help="final weight decay (cosine schedule); default: same as --weight_decay",
    )
    optim.add_argument("--clip_grad", default=3.0, type=float, help="max global gradient norm (0: no clipping)")
    optim.add_argument("--batch_size_per_gpu", default=256, type=int, help="images per process and iteration")
    optim.add_argument("--epochs", default=300, type=int, help="number of training epochs")
    optim.add_argument(
        "--max_iters",
        default=None,
        type=int,
        help="stop after this many iterations in all (smoke runs, benchmarks); schedules keep --epochs",
    )
    optim.add_argument(
        "--freeze_last_layer", default=1, type=int, help="epochs during which the head's last layer is frozen"
    )
    optim.add_argument(
        "--lr", default=1e-4, type=float, help="peak learning rate at batch 256 (scaled linearly by global batch / 256)"
    )
    optim.add_argument("--warmup_epochs", default=10, type=int, help="epochs of linear learning-rate warmup")
    optim.add_argument("--min_lr", default=1e-6, type=float, help="learning rate at the end of the cosine schedule")
    optim.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="optimiser")

    aug = parser.add_argument_group("multi-crop")
    aug.add_argument(
        "--global_crops_scale",
        type=float,
        nargs=2,
        default=(0.4, 1.0),
        help="area range of the global crops, as fractions of the image",
    )
    aug.add_argument("--local_crops_number", type=int, default=2, help="number of local crops (0: global crops only)")
    aug.add_argument(
        "--local_crops_scale",
        type=float,
        nargs=2,
        default=(0.08, 0.4),
        help="area range of the local crops, as fractions of the image",
    )
    aug.add_argument(
        "--global_crop_size", type=int, default=128, help="side of the global crops in pixels (the model's image size)"
    )
    aug.add_argument("--local_crop_size", type=int, default=64, help="side of the local crops in pixels")

    data = parser.add_argument_group("data and run")
    data.add_argument(
        "--dataset",
        default="folder",
        choices=["folder", "synthetic"],
        help="folder: images under --data_path (TinyImageNet, any ImageFolder, or a flat folder); "
        "synthetic: the embedded shapes dataset, generated into --data_path",
    )
    data.add_argument(
        "--data_path",
        default=None,
        type=str,
        help="dataset root (default: data/tiny-imagenet-200, or data/synthetic with --dataset synthetic)",
    )
    data.add_argument("--download", action="store_true", help="download and prepare TinyImageNet into --data_path")
    data.add_argument(
        "--output_dir", default="runs/dino", type=str, help="where checkpoints and logs go (a rerun resumes)"
    )
    data.add_argument("--saveckp_freq", default=20, type=int, help="keep checkpointNNNN.pth every this many epochs")
    data.add_argument("--seed", default=0, type=int, help="random seed")
    data.add_argument(
        "--num_workers", default=min(8, torch.get_num_threads()), type=int, help="data loading workers per process"
    )
    data.add_argument(
        "--knn_every",
        default=10,
        type=int,
        help="online weighted k-NN (k=20, T=0.07) of the teacher every this many epochs and at the end (0: off)",
    )
    data.add_argument("--print_freq", default=10, type=int, help="console progress every this many iterations")
    data.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
    data.add_argument(
        "--dist_timeout",
        default=1800,
        type=float,
        help="seconds a process waits for the others before failing (a dead rank never hangs the job)",
    )
    data.add_argument(
        "--max_nonfinite", default=10, type=int, help="stop after this many consecutive non-finite losses"
    )
    data.add_argument("-h", "--help", action="help", help="show this help and exit")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Out-of-range flags are user mistakes: a one-line error before anything is written."""
    problems = []
    if args.epochs <= 0:
        problems.append(f"--epochs must be positive (got {args.epochs})")
    if args.batch_size_per_gpu <= 0:
        problems.append(f"--batch_size_per_gpu must be positive (got {args.batch_size_per_gpu})")
    if not 0 <= args.local_crops_number <= 64:
        problems.append(f"--local_crops_number must be in [0, 64] (got {args.local_crops_number})")
    for name in ("global_crops_scale", "local_crops_scale"):
        lo, hi = getattr(args, name)
        if not 0 < lo <= hi <= 1:
            problems.append(f"--{name} must satisfy 0 < min <= max <= 1 (got {lo} {hi})")
    for name in ("global_crop_size", "local_crop_size"):
        if getattr(args, name) < args.patch_size:
            problems.append(f"--{name} must be at least --patch_size ({args.patch_size})")
    if args.out_dim <= 0:
        problems.append(f"--out_dim must be positive (got {args.out_dim})")
    if args.max_iters is not None and args.max_iters <= 0:
        problems.append(f"--max_iters must be positive (got {args.max_iters})")
    if not 0 <= args.momentum_teacher <= 1:
        problems.append(f"--momentum_teacher must be in [0, 1] (got {args.momentum_teacher})")
    if problems:
        raise UsageError("; ".join(problems))


def build_train_loader(args, dataset, ctx) -> DataLoader:
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=args.seed)
    loader = DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers,
        pin_memory=ctx.device.type == "cuda",
        drop_last=True,
        persistent_workers=args.num_workers > 0,
        generator=torch.Generator().manual_seed(args.seed + ctx.rank),
    )
    if len(loader) == 0:
        raise UsageError(
            f"the dataset has {len(dataset)} images, fewer than one batch of {args.batch_size_per_gpu} per process x "
            f"{ctx.world_size} processes: lower --batch_size_per_gpu"
        )
    return loader


def train_dino(args: argparse.Namespace) -> dict:
    """The whole pretraining run; returns the final record (what ``log.txt``'s last line holds)."""
    validate_args(args)
    ctx = init_distributed_mode(args.device, timeout_s=args.dist_timeout)
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    data_path = prepare_data_path(args.dataset, args.data_path, args.download, is_main=ctx.is_main)
    augmentation = DataAugmentationDINO(
        args.global_crops_scale,
        args.local_crops_scale,
        args.local_crops_number,
        args.global_crop_size,
        args.local_crop_size,
    )
    dataset = build_image_dataset(data_path, "train", transform=augmentation)
    loader = build_train_loader(args, dataset, ctx)
    log(
        f"data: {len(dataset)} training images from {data_path}, {len(loader)} iterations per epoch on "
        f"{ctx.world_size} process(es), device {ctx.device}"
    )

    student, teacher = build_dino_models(args)
    student, teacher = student.to(ctx.device), teacher.to(ctx.device)
    student_module = student
    if ctx.world_size > 1:
        student = DistributedDataParallel(student, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    n_backbone, n_head = count_parameters(student_module.backbone) / 1e6, count_parameters(student_module.head) / 1e6
    log(f"model: {args.arch} (patch {args.patch_size}), {n_backbone:.2f} M backbone + {n_head:.2f} M head parameters")

    precision = resolve_precision(args.precision, ctx.device)
    dino_loss = DINOLoss(
        args.out_dim,
        args.local_crops_number + 2,
        args.warmup_teacher_temp,
        args.teacher_temp,
        args.warmup_teacher_temp_epochs,
        args.epochs,
    ).to(ctx.device)
    optimizer = build_optimizer(args.optimizer, get_params_groups(student_module))
    scaler = build_grad_scaler(precision, ctx.device)
    state = DINOState(
        student,
        teacher,
        student_module,
        dino_loss,
        optimizer,
        scaler,
        ctx.device,
        precision,
        args.clip_grad,
        args.freeze_last_layer,
    )

    niter = len(loader)
    global_batch = args.batch_size_per_gpu * ctx.world_size
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    schedules = {
        "lr": cosine_scheduler(args.lr * global_batch / 256.0, args.min_lr, args.epochs, niter, args.warmup_epochs),
        "wd": cosine_scheduler(args.weight_decay, wd_end, args.epochs, niter),
        "momentum": teacher_momentum_schedule(args.momentum_teacher, args.epochs, niter),
    }

    run = {"epoch": 0, "global_iter": 0, "knn_random_init": None}
    checkpoint_path = output_dir / "checkpoint.pth"
    if restart_from_checkpoint(
        checkpoint_path,
        run,
        student=student_module,
        teacher=teacher,
        optimizer=optimizer,
        scaler=scaler,
        dino_loss=dino_loss,
    ):
        log(f"resumed from {checkpoint_path} at epoch {run['epoch']} (iteration {run['global_iter']})")
    start_epoch = run["epoch"]

    tb = TensorBoard(output_dir)
    tb.text("flags", flags_as_markdown(vars(args)))
    knn_data = knn_datasets(args, data_path)
    if knn_data and run["knn_random_init"] is None and start_epoch == 0 and run["global_iter"] == 0:
        run["knn_random_init"] = evaluate_knn(
            teacher.backbone, *knn_data, ctx.device, args.batch_size_per_gpu, args.num_workers
        )
        log(f"k-NN of the random-init backbone: top-1 {run['knn_random_init']['top1']:.2f}%")

    record: dict = {}
    start_time = time.time()
    max_iters = args.max_iters
    for epoch in range(start_epoch, args.epochs):
        if max_iters is not None and run["global_iter"] >= max_iters:
            break
        loader.sampler.set_epoch(epoch)
        averages, run["global_iter"] = train_one_epoch(
            state,
            loader,
            epoch,
            schedules,
            run["global_iter"],
            tb,
            args.print_freq,
            args.max_nonfinite,
            max_iters,
            header=f"Epoch [{epoch}/{args.epochs}]",
        )
        epoch_done = run["global_iter"] >= (epoch + 1) * niter
        record = {f"train_{k}": v for k, v in averages.items()} | {"epoch": epoch}
        record["train_wd"] = record.pop("train_weight_decay", record.get("train_wd"))
        last_epoch = epoch + 1 == args.epochs or (max_iters is not None and run["global_iter"] >= max_iters)
        if knn_data and epoch_done and ((epoch + 1) % max(args.knn_every, 1) == 0 or last_epoch):
            knn = evaluate_knn(teacher.backbone, *knn_data, ctx.device, args.batch_size_per_gpu, args.num_workers)
            record |= {"knn_top1": knn["top1"], "knn_top5": knn["top5"]}
            log(f"k-NN of the teacher after epoch {epoch}: top-1 {knn['top1']:.2f}%  top-5 {knn['top5']:.2f}%")
        tb.scalars({k: v for k, v in record.items() if k != "epoch"}, epoch, prefix="epoch/")
        checkpoint = {
            "student": student_module.state_dict(),
            "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict(),
            "dino_loss": dino_loss.state_dict(),
            "epoch": epoch + 1 if epoch_done else epoch,
            "global_iter": run["global_iter"],
            "knn_random_init": run["knn_random_init"],
            "args": vars(args),
        }
        if scaler is not None:
            checkpoint["scaler"] = scaler.state_dict()
        if ctx.is_main:
            save_checkpoint(checkpoint, checkpoint_path)
            if epoch_done and args.saveckp_freq and (epoch + 1) % args.saveckp_freq == 0:
                save_checkpoint(checkpoint, output_dir / f"checkpoint{epoch:04d}.pth")
        append_json_line(output_dir / "log.txt", record)
        tb.flush()

    tb.close()
    log(f"training time {format_duration(time.time() - start_time)}")
    final = record.get("knn_top1")
    if final is not None and run["knn_random_init"] is not None:
        log(f"k-NN top-1 on the val split: trained {final:.2f}%  vs random-init {run['knn_random_init']['top1']:.2f}%")
    cleanup()
    return record


def knn_datasets(args, data_path):
    """(train, val) datasets with the evaluation transform for the online k-NN, or None (no labels, no val, off)."""
    if args.knn_every <= 0:
        return None
    transform = eval_transform(args.global_crop_size)
    train = build_image_dataset(data_path, "train", transform=transform)
    val = build_image_dataset(data_path, "val", transform=transform)
    if val is None or not has_labels(train) or not has_labels(val):
        log("online k-NN off: it needs labelled train/ and val/ splits")
        return None
    return train, val


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("DINO", parents=[get_args_parser()], add_help=False)
    args = parser.parse_args(argv)
    with user_errors():
        train_dino(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
