"""Command-line plumbing shared by the scripts: flag types and turning user mistakes into one-line errors."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from collections.abc import Iterator

from utils.runtime.distributed import cpus_per_process
from utils.runtime.errors import UsageError, UserError

__all__ = [
    "PRECISIONS",
    "FlagFileParser",
    "UsageError",
    "add_backbone_flags",
    "add_data_flags",
    "add_precision_flag",
    "bool_flag",
    "default_loader_workers",
    "user_errors",
]

#: The most data-loading workers a process gets by default.
MAX_DEFAULT_WORKERS = 8


def bool_flag(value: str) -> bool:
    """argparse type for ``--flag True/False`` (also on/off, yes/no, 1/0), as in the official DINO scripts."""
    lowered = value.lower()
    if lowered in {"true", "on", "yes", "1"}:
        return True
    if lowered in {"false", "off", "no", "0"}:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {value!r}")


class FlagFileParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that also reads flags from ``@FILE`` arguments (``configs/*.args``).

    A flag file holds shell words in any layout (one flag per line is usual) and ``#`` comments; its flags stand where
    ``@FILE`` stands, so flags after it override it.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("fromfile_prefix_chars", "@")
        super().__init__(*args, **kwargs)

    def convert_arg_line_to_args(self, arg_line: str) -> list[str]:
        return shlex.split(arg_line, comments=True)


def default_loader_workers() -> int:
    """``--num_workers``' default: the CPUs this process may use (``cpus_per_process``: its share of the node under
    torchrun, its CPUs per task under srun), at most ``MAX_DEFAULT_WORKERS``."""
    return min(MAX_DEFAULT_WORKERS, cpus_per_process())


@contextlib.contextmanager
def user_errors(prog: str | None = None) -> Iterator[None]:
    """Run a script's body; a user mistake (a :class:`~utils.runtime.errors.UserError`) becomes
    ``<prog>: error: <message>`` on stderr and exit status 2."""
    try:
        yield
    except UserError as exc:
        name = prog or sys.argv[0].rsplit("/", 1)[-1]
        print(f"{name}: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def add_backbone_flags(parser: argparse.ArgumentParser, image_size: int | None = 128) -> argparse.ArgumentParser:
    """The flags every evaluation script shares to choose a frozen backbone and its weights; ``--image_size``
    (default ``image_size``) unless ``image_size`` is None (for a script that declares its own input-size flag)."""
    group = parser.add_argument_group("backbone")
    group.add_argument(
        "--arch",
        default="vit_tiny",
        type=str,
        help="vit_tiny, vit_small, vit_base, vit_large (timm's vit_*_patch{P}_224), or a timm ViT name",
    )
    group.add_argument("--patch_size", default=16, type=int, help="ViT patch size in pixels (for the short arch names)")
    if image_size is not None:
        group.add_argument(
            "--image_size", default=image_size, type=int, help="side of the (centre-cropped) input image"
        )
    group.add_argument(
        "--pretrained_weights",
        default="",
        type=str,
        help="our checkpoint.pth or an official DINO .pth file (empty: random init)",
    )
    group.add_argument(
        "--checkpoint_key",
        default="teacher",
        type=str,
        help='entry of a full checkpoint to load ("teacher" or "student")',
    )
    group.add_argument(
        "--timm_model",
        default=None,
        type=str,
        help="a timm pretrained name (e.g. vit_small_patch16_224.dino), fetched from the hub",
    )
    group.add_argument(
        "--trust_checkpoint",
        action="store_true",
        help="allow full unpickling of the weights file (runs code from the file: trusted files only)",
    )
    return parser


#: ``--precision`` choices: ``auto`` picks bf16 on GPUs that support it, fp16 on older GPUs, fp32 on the CPU.
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def add_precision_flag(parser, help_prefix: str = "") -> argparse.ArgumentParser:
    """``--precision {auto,fp32,fp16,bf16}`` (default auto) with main_dino.py's meaning, on ``parser`` (a parser or an
    argument group); ``help_prefix`` says what it applies to in this script."""
    parser.add_argument(
        "--precision",
        default="auto",
        choices=list(PRECISIONS),
        help=f"{help_prefix}auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU",
    )
    return parser


def add_data_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags that choose the labelled dataset (train/ and val/ splits) of the evaluation scripts."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        default="folder",
        choices=["folder", "synthetic"],
        help="folder: train/ and val/ under --data_path (TinyImageNet or any ImageFolder); "
        "synthetic: the embedded shapes dataset",
    )
    group.add_argument(
        "--data_path",
        default=None,
        type=str,
        help="dataset root (default: data/tiny-imagenet-200, or data/synthetic with --dataset synthetic)",
    )
    group.add_argument("--download", action="store_true", help="download and prepare TinyImageNet into --data_path")
    group.add_argument("--batch_size_per_gpu", default=128, type=int, help="images per process and batch")
    group.add_argument(
        "--num_workers",
        default=default_loader_workers(),
        type=int,
        help="data loading workers per process (default: this process's CPUs, at most 8: %(default)s here)",
    )
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
    group.add_argument("--output_dir", default=".", type=str, help="where results are written")
    return parser
