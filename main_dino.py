"""DINO self-supervised pretraining of a Vision Transformer.

    python main_dino.py @configs/quickstart.args                                  # one CPU or GPU; flags from a file
    torchrun --nproc_per_node=4 main_dino.py --data_path data/tiny-imagenet-200   # several GPUs (DDP)

Flags follow the official facebookresearch/dino ``main_dino.py`` where the concept is the same; defaults follow the
original TinyImageNet notebook (ViT-Tiny, 128 px global crops, 2 + 2 crops, lr 1e-4, wd 1e-6).
"""

from __future__ import annotations

import argparse
import sys

from utils.model.vit import ARCH_ALIASES, check_arch
from utils.runtime.cli import FlagFileParser, bool_flag, default_loader_workers, user_errors
from utils.runtime.errors import UsageError
from utils.train import run
from utils.train.loss import CENTERINGS, DINOLoss
from utils.train.optim import CLIP_MODES

__all__ = ["DINOLoss", "cli", "get_args_parser", "main"]


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
    model.add_argument(
        "--koleo_loss_weight",
        default=0.0,
        type=float,
        help="weight of DINOv2's KoLeo regulariser on the student's global-crop CLS features (spreads them over the "
        "sphere; counters the early dimensional collapse of short runs, e.g. 0.1 as in DINOv2; computed per "
        "process); 0: off, as in DINO",
    )

    temp = parser.add_argument_group("temperatures")
    temp.add_argument("--warmup_teacher_temp", default=0.04, type=float, help="teacher temperature at epoch 0")
    temp.add_argument("--teacher_temp", default=0.04, type=float, help="teacher temperature after the warmup")
    temp.add_argument(
        "--warmup_teacher_temp_epochs", default=0, type=int, help="epochs of linear teacher-temperature warmup"
    )
    temp.add_argument(
        "--centering",
        default="centering",
        choices=CENTERINGS,
        help="the teacher's targets: centering (official DINO: subtract an EMA centre, then softmax) or "
        "sinkhorn_knopp (DINOv2's option: 3 Sinkhorn-Knopp rounds over the global batch, no centre; not in DINO)",
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
    optim.add_argument(
        "--clip_grad",
        default=3.0,
        type=float,
        help="maximal gradient norm (0: no clipping); by default of each parameter's gradient (see --clip_grad_mode)",
    )
    optim.add_argument(
        "--clip_grad_mode",
        default="param",
        choices=CLIP_MODES,
        help="param: clip each parameter's gradient norm separately, as official DINO; global: clip the joint norm "
        "of all gradients (one factor for all, keeps the update's direction; not in official DINO)",
    )
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
    aug.add_argument(
        "--blur_sigma",
        type=float,
        nargs=2,
        default=(0.1, 2.0),
        help="range of the Gaussian blur's standard deviation in output pixels (official DINO: 0.1 2.0, for 224 px)",
    )

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
        "--num_workers",
        default=default_loader_workers(),
        type=int,
        help="data loading workers per process (default: this process's CPUs, at most 8)",
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
    data.add_argument(
        "--compile", action="store_true", help="torch.compile the student and teacher (slow start, faster steps)"
    )
    data.add_argument(
        "--cache_images",
        default="auto",
        choices=["auto", "on", "off"],
        help="decode the images once into a uint8 memory map in --cache_dir (rebuilt when the files change); auto: "
        "when the decoded dataset fits 8 GiB",
    )
    data.add_argument(
        "--cache_dir",
        default=None,
        type=str,
        help="where the decoded-image cache lives (default: the per-user cache folder "
        "$XDG_CACHE_HOME/tinydino/<dataset folder>-<hash of its path>, ~/.cache/tinydino/... when XDG_CACHE_HOME is "
        "unset; the dataset folder is never written to)",
    )
    data.add_argument(
        "--batched_aug",
        default="auto",
        choices=["auto", "on", "off"],
        help="multi-crop augmentation of whole batches on the training device, from the cache (auto: whenever the "
        "images are cached); off: the per-image PIL pipeline in data workers",
    )
    data.add_argument(
        "--attn_every",
        default=0,
        type=int,
        help="log the teacher's last-layer attention maps of 4 fixed images to TensorBoard every this many epochs",
    )
    data.add_argument(
        "--checkpoint_every",
        default=0,
        type=int,
        help="also save checkpoint.pth every this many iterations (0: at epoch ends only); a rerun resumes exactly",
    )
    data.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels (torch.use_deterministic_algorithms, warn_only): on the CPU a resumed run matches "
        "an uninterrupted one bit for bit; on CUDA the operations without a deterministic kernel (the backward of the "
        "position embeddings' bicubic interpolation, which local crops use) warn and stay non-deterministic, so a "
        "resumed GPU run is close to, but not bitwise identical with, an uninterrupted one",
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
    if not 0 < args.blur_sigma[0] <= args.blur_sigma[1]:
        problems.append(f"--blur_sigma must satisfy 0 < min <= max (got {args.blur_sigma[0]} {args.blur_sigma[1]})")
    for name in ("global_crop_size", "local_crop_size"):
        if getattr(args, name) < args.patch_size:
            problems.append(f"--{name} must be at least --patch_size ({args.patch_size})")
    if args.out_dim <= 0:
        problems.append(f"--out_dim must be positive (got {args.out_dim})")
    if args.max_iters is not None and args.max_iters <= 0:
        problems.append(f"--max_iters must be positive (got {args.max_iters})")
    if args.koleo_loss_weight < 0:
        problems.append(f"--koleo_loss_weight must be >= 0 (got {args.koleo_loss_weight})")
    if not 0 <= args.momentum_teacher <= 1:
        problems.append(f"--momentum_teacher must be in [0, 1] (got {args.momentum_teacher})")
    if problems:
        raise UsageError("; ".join(problems))
    check_arch(args.arch)


def main(args: argparse.Namespace) -> dict:
    """The whole pretraining on parsed flags (the entry of the command line and of SLURM jobs): validates them, trains
    from wherever ``--output_dir`` left off and returns the final record (``log.txt``'s last line; ``stop_signal``
    set when a signal stopped the run after its checkpoint). User mistakes raise a user error
    (:mod:`utils.runtime.errors`)."""
    validate_args(args)
    return run.train_dino(args)


def cli(argv: list[str] | None = None) -> int:
    """The command line: parse ``argv``, run :func:`main`; a user mistake exits with status 2 and one line."""
    parser = FlagFileParser("DINO", parents=[get_args_parser()], add_help=False)
    args = parser.parse_args(argv)
    with user_errors():
        main(args)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
