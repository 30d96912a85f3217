"""Self-attention maps of a DINO ViT: where the CLS token of the last block looks, per head, with masks.

    python visualize_attention.py                                          # scikit-learn's sample photo, random ViT
    python visualize_attention.py --pretrained_weights runs/x/checkpoint.pth --image_path photo.jpg --output_dir att
    python visualize_attention.py --pretrained_weights dino_deitsmall16_pretrain.pth --arch vit_small \\
        --image_path photos/ --image_size 480 --threshold 0.6 --output_dir att
    python visualize_attention.py --dataset stl10 --data_path data/stl10 --num_images 8 --seed 0 --output_dir att

For each image, ``--output_dir`` gets ``NAME_grid.png`` (the image, the mean over heads, each head's heat map, the
masks outlined on the image), ``NAME_image.png`` (the resized, cropped input the model saw), ``NAME_mean.png`` and,
per head ``i``, ``NAME_headii.png`` (heat map) and ``NAME_headii_mask.png`` (white = kept), all at the image's size.

Image size: one ``--image_size S`` resizes the shorter side to ``S`` (aspect ratio kept); two values ``H W`` resize to
exactly ``H x W``. The result is then centre-cropped to multiples of the patch size (non-square is fine: the ViT
interpolates its position embeddings). Flags follow the official facebookresearch/dino ``visualize_attention.py``
where the concept is the same.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms

from utils.data.augment.per_image import IMAGENET_MEAN, IMAGENET_STD
from utils.data.folders import IMG_EXTENSIONS
from utils.eval.attention import (
    MASK_MODES,
    attention_grid_figure,
    attention_mask,
    backbone_cls_attention,
    crop_to_patch_multiple,
    heatmap_image,
    mask_description,
    mask_image,
)
from utils.model.weights import build_pretrained_backbone
from utils.runtime.cli import add_backbone_flags, user_errors
from utils.runtime.errors import UsageError

SAMPLE_IMAGE = "china.jpg"  # one of the photographs shipped inside scikit-learn (sklearn.datasets.load_sample_image)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "Visualize self-attention maps",
        add_help=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        conflict_handler="resolve",  # the images group's --image_size (S or H W) replaces the shared one
    )
    add_backbone_flags(parser)

    data = parser.add_argument_group("images")
    data.add_argument(
        "--image_path",
        default=None,
        type=str,
        help="an image file, or a folder of images (one grid each); default: scikit-learn's sample photo "
        f"{SAMPLE_IMAGE}",
    )
    data.add_argument(
        "--dataset", default=None, choices=["stl10"], help="random test images of a dataset instead of --image_path"
    )
    data.add_argument(
        "--data_path", default="data/stl10", type=str, help="root of --dataset (holding stl10_binary/ for STL-10)"
    )
    data.add_argument(
        "--download",
        action="store_true",
        help="with --dataset stl10: download (2.5 GB) and extract it into --data_path",
    )
    data.add_argument("--num_images", default=4, type=int, help="how many random --dataset images")
    data.add_argument("--seed", default=0, type=int, help="seed of the random choice of --dataset images")
    data.add_argument(
        "--image_size",
        default=[224],
        type=int,
        nargs="+",
        help="S: resize the shorter side to S (aspect kept); H W: resize to H x W. Then centre-cropped to multiples "
        "of the patch size",
    )

    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", default=".", type=str, help="folder for the PNGs (created if needed)")
    out.add_argument(
        "--threshold",
        default=0.6,
        type=float,
        help="mask threshold in [0, 1]: the fraction of attention mass kept (--mask_mode mass) or of the max value",
    )
    out.add_argument(
        "--mask_mode",
        default="mass",
        choices=MASK_MODES,
        help="mass: per head, the fewest patches holding --threshold of the attention (DINO's masks); "
        "value: patches with attention >= threshold x the head's max",
    )
    out.add_argument(
        "--upsample",
        default="nearest",
        choices=["nearest", "bilinear"],
        help="how per-head heat-map PNGs are scaled from the patch grid to the image (nearest: one block per patch)",
    )
    out.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    if not 0.0 <= args.threshold <= 1.0:  # also refuses nan
        raise UsageError(f"--threshold must be in [0, 1], got {args.threshold}")
    if len(args.image_size) not in (1, 2):
        raise UsageError(f"--image_size takes one value (shorter side) or two (H W), got {len(args.image_size)}")
    if args.patch_size < 1:
        raise UsageError(f"--patch_size must be positive, got {args.patch_size}")
    if min(args.image_size) < args.patch_size:
        raise UsageError(f"--image_size {args.image_size} is smaller than one patch ({args.patch_size} px)")
    if args.dataset and args.image_path:
        raise UsageError("give either --image_path or --dataset, not both")
    if args.dataset and args.num_images < 1:
        raise UsageError(f"--num_images must be at least 1, got {args.num_images}")
    if args.image_path and not Path(args.image_path).exists():
        raise UsageError(f"--image_path {args.image_path} does not exist")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but CUDA is not available (use --device cpu)")


# --------------------------------------------------------------------------------------------------------------------
# Inputs: (name, PIL image) pairs
# --------------------------------------------------------------------------------------------------------------------


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")  # forces the full decode: a truncated file fails here, not later


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{name}_{n}"
    used.add(candidate)
    return candidate


def folder_images(folder: Path) -> list[Path]:
    """The image files directly inside ``folder`` (by extension, not hidden), sorted by name."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    images = [p for p in files if p.suffix.lower() in IMG_EXTENSIONS]
    if not images:
        raise UsageError(f"--image_path {folder} holds no image files ({', '.join(IMG_EXTENSIONS)})")
    return images


def iter_images(args: argparse.Namespace) -> Iterator[tuple[str, str, Image.Image]]:
    """``(file-name stem, description, PIL RGB image)`` for every input; unreadable folder images are skipped."""
    used: set[str] = set()
    if args.dataset == "stl10":
        yield from _stl10_images(args)
    elif args.image_path is None:
        from sklearn.datasets import load_sample_image

        yield (
            Path(SAMPLE_IMAGE).stem,
            f"{SAMPLE_IMAGE} (scikit-learn sample)",
            Image.fromarray(load_sample_image(SAMPLE_IMAGE)),
        )
    elif Path(args.image_path).is_dir():
        readable = 0
        for path in folder_images(Path(args.image_path)):
            try:
                img = _open_rgb(path)
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                print(f"warning: skipping {path}: not a readable image ({exc})", file=sys.stderr, flush=True)
                continue
            readable += 1
            yield _unique(path.stem, used), path.name, img
        if not readable:
            raise UsageError(f"no readable image in --image_path {args.image_path}")
    else:
        path = Path(args.image_path)
        try:
            img = _open_rgb(path)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise UsageError(f"cannot read --image_path {path} as an image ({exc})") from exc
        yield path.stem, path.name, img


def _stl10_images(args: argparse.Namespace) -> Iterator[tuple[str, str, Image.Image]]:
    try:
        from utils.data.stl10 import STL10Binary, download_stl10
    except ImportError as exc:
        raise UsageError(f"--dataset stl10 is not available in this installation ({exc})") from exc
    if args.download:
        download_stl10(args.data_path)
    dataset = STL10Binary(args.data_path, split="test")  # a missing/corrupt dataset: DatasetError, one line
    generator = torch.Generator().manual_seed(args.seed)
    indices = torch.randperm(len(dataset), generator=generator)[: args.num_images].tolist()
    classes = list(getattr(dataset, "classes", []))
    for index in indices:
        img, label = dataset[index]
        label = int(label)
        class_name = classes[label] if 0 <= label < len(classes) else str(label)
        yield f"stl10_test{index:04d}_{class_name}", f"STL-10 test #{index} ({class_name})", img.convert("RGB")


def prepare(img: Image.Image, image_size: list[int], patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL image → (picture ``[3, H, W]`` in [0, 1], normalised ``[1, 3, H, W]``), ``H, W`` multiples of the patch."""
    size = image_size[0] if len(image_size) == 1 else tuple(image_size)
    resized = transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True)(img)
    picture = crop_to_patch_multiple(transforms.functional.to_tensor(resized), patch_size).clamp(0, 1)
    normalised = transforms.functional.normalize(picture, IMAGENET_MEAN, IMAGENET_STD)
    return picture, normalised[None]


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def _save_png(array: np.ndarray, path: Path, written: list[Path]) -> None:
    Image.fromarray(array).save(path)
    written.append(path)


def main(args: argparse.Namespace) -> list[Path]:
    """Write the PNGs of every input image on parsed flags (the script's entry); returns their paths. User mistakes
    raise :class:`~utils.runtime.errors.UsageError` (or another user error)."""
    validate_args(args)
    images = iter_images(args)
    first = next(images)  # fail on a bad input before building the model
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    model = build_pretrained_backbone(
        args.arch,
        args.patch_size,
        224,  # the stored position-embedding grid; any image size works (interpolated)
        pretrained_weights=args.pretrained_weights or None,
        checkpoint_key=args.checkpoint_key,
        timm_model=args.timm_model,
        trust=args.trust_checkpoint,
    )
    model = model.to(device).eval()
    if args.timm_model:
        source = f"timm {args.timm_model}"
    elif args.pretrained_weights:
        source = f"{args.arch}/{model.patch_size} from {Path(args.pretrained_weights).name} ({args.checkpoint_key})"
    else:
        source = f"{args.arch}/{model.patch_size}, random init"
        print("note: no --pretrained_weights or --timm_model: a random-init ViT, its attention shows no structure")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    label = mask_description(args.mask_mode, args.threshold)

    written: list[Path] = []
    count = 0
    for name, description, img in itertools.chain([first], images):
        picture, normalised = prepare(img, args.image_size, model.patch_size)
        maps = backbone_cls_attention(model, normalised.to(device))[0].cpu()  # [heads, h, w]
        masks = attention_mask(maps, args.threshold, args.mask_mode)
        height, width = picture.shape[-2:]
        fig = attention_grid_figure(picture, maps, masks, title=f"{description} — {source}", mask_label=label, dpi=100)
        grid_path = output_dir / f"{name}_grid.png"
        fig.savefig(grid_path)
        written.append(grid_path)
        image_u8 = (picture.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
        _save_png(image_u8, output_dir / f"{name}_image.png", written)
        _save_png(heatmap_image(maps.mean(0), (height, width), args.upsample), output_dir / f"{name}_mean.png", written)
        for head in range(maps.shape[0]):
            heat = heatmap_image(maps[head], (height, width), args.upsample)
            _save_png(heat, output_dir / f"{name}_head{head:02d}.png", written)
            _save_png(mask_image(masks[head], (height, width)), output_dir / f"{name}_head{head:02d}_mask.png", written)
        count += 1
        print(
            f"{description}: {height}x{width} px, {maps.shape[0]} heads -> {grid_path} (+ {2 * maps.shape[0] + 2} PNGs)"
        )
    print(f"wrote {len(written)} PNGs for {count} image(s) to {output_dir}/ (masks: {label})")
    return written


def cli(argv: list[str] | None = None) -> int:
    """The command line: parse ``argv``, run :func:`main`; a user mistake exits with status 2 and one line."""
    parser = argparse.ArgumentParser(
        "visualize_attention.py",
        parents=[get_args_parser()],
        description="Self-attention maps of a DINO ViT's CLS token (last block), per head, with masks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    args = parser.parse_args(argv)
    with user_errors():
        main(args)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
