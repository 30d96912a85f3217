"""The embedded ``synthetic`` dataset: procedurally drawn shapes, TinyImageNet-like, no download.

Every image shows one large shape (circle, square, triangle, star, ...) whose *geometry* is the class.
Everything else is nuisance drawn independently of the class: foreground and background colours,
position, scale, rotation, a slight aspect change, a background texture (flat, gradient, blotches or
random lines), a few small distractor blobs and pixel noise. Raw pixels and random features are therefore
dominated by the nuisances, while a network that learned shape (as DINO does, thanks to its colour
augmentations and multi-crop) separates the classes well: this is what the quickstart shows with a k-NN.

The dataset is written as 64x64 RGB JPEGs in ImageFolder layout::

    <root>/train/<class_name>/<name>.JPEG
    <root>/val/<class_name>/<name>.JPEG

It is a pure function of its parameters: image ``i`` of class ``c`` in split ``s`` is rendered from
``numpy.random.default_rng([seed, split_id, c, i])`` (numpy + PIL only), so the same parameters give
byte-identical files on every run. A JSON marker written last makes a second call a no-op and an
interrupted generation detectable (it is then redone from scratch).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SYNTHETIC_CLASSES", "generate_synthetic_dataset", "render_sample"]

MARKER_NAME = ".tinydino_synthetic.json"
STAGING_NAME = ".tinydino_synthetic_tmp"
FORMAT_VERSION = 2
SPLIT_IDS = {"train": 0, "val": 1}
SUPERSAMPLE = 4  # the shape mask is drawn at 4x resolution and box-filtered down (anti-aliasing)

# A shape is a list of primitives in a canonical frame where the shape fits in the unit disc.
# ("poly", [(x, y), ...], fill) | ("disc", (x, y), radius, fill) | ("line", [(x, y), ...], width, fill)
# fill 1 paints the shape, fill 0 erases (holes). ``variant`` in [0, 1) picks a class-internal variant.
Primitive = tuple
ShapeFn = Callable[[float], list[Primitive]]


def _regular_polygon(n: int, radius: float, phase: float = math.pi / 2) -> list[tuple[float, float]]:
    """Vertices of a regular ``n``-gon of circumradius ``radius``."""
    return [
        (radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _circle(variant: float) -> list[Primitive]:
    return [("disc", (0.0, 0.0), 0.9, 1)]


def _square(variant: float) -> list[Primitive]:
    return [("poly", _regular_polygon(4, 1.0, math.pi / 4), 1)]


def _triangle(variant: float) -> list[Primitive]:
    pts = _regular_polygon(3, 1.1)
    return [("poly", [(x, y + 0.15) for x, y in pts], 1)]  # centre the bounding box, not the centroid


def _star(variant: float) -> list[Primitive]:
    outer = _regular_polygon(5, 1.05)
    inner = _regular_polygon(5, 0.42, math.pi / 2 + math.pi / 5)
    return [("poly", [p for pair in zip(outer, inner) for p in pair], 1)]


def _cross(variant: float) -> list[Primitive]:
    a, w = 0.95, 0.3
    pts = [(w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w), (-w, -a), (w, -a), (w, -w), (a, -w), (a, w)]
    return [("poly", pts, 1)]


def _ring(variant: float) -> list[Primitive]:
    return [("disc", (0.0, 0.0), 0.95, 1), ("disc", (0.0, 0.0), 0.55, 0)]


def _stripes(variant: float) -> list[Primitive]:
    bands = 3 + int(variant * 2)  # 3 or 4 bars
    a = 0.85
    step = 2 * a / (2 * bands - 1)
    return [
        ("poly", [(-a, y0), (a, y0), (a, y0 + step), (-a, y0 + step)], 1)
        for y0 in (-a + 2 * k * step for k in range(bands))
    ]


def _checkerboard(variant: float) -> list[Primitive]:
    cells = 3 + int(variant * 2)  # 3x3 or 4x4
    a = 0.8
    step = 2 * a / cells
    return [
        ("poly", [(x0, y0), (x0 + step, y0), (x0 + step, y0 + step), (x0, y0 + step)], 1)
        for i in range(cells)
        for j in range(cells)
        if (i + j) % 2 == 0
        for x0, y0 in [(-a + i * step, -a + j * step)]
    ]


def _crescent(variant: float) -> list[Primitive]:
    return [("disc", (0.0, 0.0), 0.95, 1), ("disc", (0.5, 0.0), 0.8, 0)]


def _arrow(variant: float) -> list[Primitive]:
    pts = [(-1.0, -0.2), (0.15, -0.2), (0.15, -0.6), (1.0, 0.0), (0.15, 0.6), (0.15, 0.2), (-1.0, 0.2)]
    return [("poly", pts, 1)]


def _heart(variant: float) -> list[Primitive]:
    ts = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    xs = 16 * np.sin(ts) ** 3
    ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))  # y points down in images
    scale = 1.0 / 16.5
    return [("poly", [(float(x) * scale, (float(y) + 2.5) * scale) for x, y in zip(xs, ys)], 1)]


def _spiral(variant: float) -> list[Primitive]:
    ts = np.linspace(0, 4 * np.pi, 80)
    rs = 0.12 + 0.85 * ts / (4 * np.pi)
    return [("line", [(float(r * np.cos(t)), float(r * np.sin(t))) for r, t in zip(rs, ts)], 0.2, 1)]


_SHAPES: dict[str, ShapeFn] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "star": _star,
    "cross": _cross,
    "ring": _ring,
    "stripes": _stripes,
    "checkerboard": _checkerboard,
    "crescent": _crescent,
    "arrow": _arrow,
    "heart": _heart,
    "spiral": _spiral,
}

SYNTHETIC_CLASSES: list[str] = [f"{k:02d}_{name}" for k, name in enumerate(_SHAPES)]
"""Class folder names, in label order; the first ``num_classes`` are used (10 by default)."""


# ----------------------------------------------------------------------------------------------- nuisances
def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


#: The colours images are painted with: 6 hues, each bright and dark, plus near-white and near-black. A small
#: palette keeps colour a nuisance (drawn independently of the class) while making it a poor *instance* identifier:
#: many images of a batch share their colours, so self-supervision cannot tell two images apart by colour alone and
#: has to look at shape.
PALETTE = np.array(
    [
        [0.95, 0.25, 0.2],
        [0.95, 0.8, 0.2],
        [0.3, 0.85, 0.3],
        [0.2, 0.8, 0.9],
        [0.3, 0.4, 0.95],
        [0.9, 0.35, 0.85],
        [0.45, 0.1, 0.08],
        [0.45, 0.38, 0.05],
        [0.08, 0.35, 0.1],
        [0.05, 0.32, 0.4],
        [0.1, 0.12, 0.45],
        [0.4, 0.08, 0.38],
        [0.93, 0.93, 0.9],
        [0.08, 0.08, 0.1],
    ]
)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A colour of :data:`PALETTE`, slightly perturbed (so that pixels are not all identical)."""
    return np.clip(PALETTE[rng.integers(len(PALETTE))] + rng.normal(0, 0.03, 3), 0, 1)


def _contrasting_colours(rng: np.random.Generator, min_contrast: float = 0.28) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background colours whose luminances differ by at least ``min_contrast``."""
    while True:
        fg, bg = _random_colour(rng), _random_colour(rng)
        if abs(_luminance(fg) - _luminance(bg)) >= min_contrast:
            return fg, bg


def _sample_nuisance(rng: np.random.Generator) -> dict:
    """All class-independent random choices of one image (drawn before anything class-specific)."""
    fg, bg = _contrasting_colours(rng)
    radius = rng.uniform(0.24, 0.38)  # of the image side
    margin = radius * 0.85
    return {
        "fg": fg,
        "bg": bg,
        "bg2": np.clip(bg + rng.normal(0, 0.25, 3), 0, 1),
        "fg_shade": rng.normal(0, 0.12, 2),  # linear shading of the shape
        "texture": int(rng.integers(4)),
        "texture_seed": int(rng.integers(2**31)),
        "centre": rng.uniform(margin, 1 - margin, 2),
        "radius": radius,
        "angle": rng.uniform(0, 2 * math.pi),
        "aspect": rng.uniform(0.85, 1.15),
        "variant": rng.random(),
        "distractors": int(rng.integers(0, 5)),
        "distractor_seed": int(rng.integers(2**31)),
        "noise": rng.uniform(0.0, 0.06),
        "noise_seed": int(rng.integers(2**31)),
    }


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1], shape (size, size) each (y, x)."""
    c = (np.arange(size) + 0.5) / size
    return np.meshgrid(c, c, indexing="ij")


def _background(nz: dict, size: int) -> np.ndarray:
    """An HxWx3 float background: flat, linear gradient, low-frequency blotches or random lines."""
    rng = np.random.default_rng(nz["texture_seed"])
    bg, bg2 = nz["bg"], nz["bg2"]
    kind = nz["texture"]
    if kind == 1:  # linear gradient at a random angle
        yy, xx = _grid(size)
        a = rng.uniform(0, 2 * math.pi)
        t = (math.cos(a) * (xx - 0.5) + math.sin(a) * (yy - 0.5)) / math.sqrt(0.5) * 0.5 + 0.5
        return bg * (1 - t[..., None]) + bg2 * t[..., None]
    if kind == 2:  # blotches: a coarse random mix of bg and bg2, bilinearly upsampled
        coarse = Image.fromarray((rng.random((4, 4)) * 255).astype(np.uint8))
        t = np.asarray(coarse.resize((size, size), Image.BILINEAR), dtype=np.float64)[..., None] / 255
        return bg * (1 - t) + bg2 * t
    canvas = np.broadcast_to(bg, (size, size, 3)).copy()
    if kind == 3:  # thin random lines, half transparent
        img = Image.fromarray((canvas * 255).astype(np.uint8))
        layer = Image.new("RGB", (size, size))
        mask = Image.new("L", (size, size))
        draw_l, draw_m = ImageDraw.Draw(layer), ImageDraw.Draw(mask)
        for _ in range(int(rng.integers(4, 12))):
            xy = [tuple(p) for p in (rng.uniform(-0.1, 1.1, (2, 2)) * size).tolist()]
            colour = tuple(int(v) for v in _random_colour(rng) * 255)
            width = int(rng.integers(1, 3))
            draw_l.line(xy, fill=colour, width=width)
            draw_m.line(xy, fill=140, width=width)
        img.paste(layer, (0, 0), mask)
        return np.asarray(img, dtype=np.float64) / 255
    return canvas


def _draw_primitives(primitives: list[Primitive], nz: dict, size: int) -> Image.Image:
    """Rasterise the canonical shape through the image's pose into an "L" mask of side ``size``."""
    cos_a, sin_a = math.cos(nz["angle"]), math.sin(nz["angle"])
    r = nz["radius"] * size
    cx, cy = nz["centre"] * size
    sx, sy = r * nz["aspect"], r / nz["aspect"]

    def to_px(x: float, y: float) -> tuple[float, float]:
        x, y = x * sx, y * sy
        return cx + cos_a * x - sin_a * y, cy + sin_a * x + cos_a * y

    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for prim in primitives:
        kind, fill = prim[0], 255 * prim[-1]
        if kind == "poly":
            draw.polygon([to_px(x, y) for x, y in prim[1]], fill=fill)
        elif kind == "disc":  # a fine polygon, so that aspect and rotation apply as to any other primitive
            (x0, y0), rad = prim[1], prim[2]
            draw.polygon([to_px(x0 + x, y0 + y) for x, y in _regular_polygon(96, rad)], fill=fill)
        elif kind == "line":
            draw.line([to_px(x, y) for x, y in prim[1]], fill=fill, width=max(1, round(prim[2] * r)), joint="curve")
        else:
            raise ValueError(f"unknown primitive {kind!r}")
    return mask


def _shape_alpha(class_index: int, nz: dict, image_size: int) -> np.ndarray:
    """Anti-aliased HxW coverage in [0, 1] of the class's shape."""
    primitives = _SHAPES[SYNTHETIC_CLASSES[class_index].split("_", 1)[1]](nz["variant"])
    mask = _draw_primitives(primitives, nz, image_size * SUPERSAMPLE)
    return np.asarray(mask.resize((image_size, image_size), Image.BOX), dtype=np.float64) / 255


def _foreground(nz: dict, size: int) -> np.ndarray:
    """The shape's fill: its colour with a gentle linear shading."""
    yy, xx = _grid(size)
    shade = 1 + nz["fg_shade"][0] * (xx - 0.5) * 2 + nz["fg_shade"][1] * (yy - 0.5) * 2
    return np.clip(nz["fg"] * shade[..., None], 0, 1)


def _add_distractors(img: np.ndarray, nz: dict) -> np.ndarray:
    """Paint a few small random blobs (radius 1-3 px) of random colours anywhere."""
    rng = np.random.default_rng(nz["distractor_seed"])
    size = img.shape[0]
    yy, xx = _grid(size)
    for _ in range(nz["distractors"]):
        (cy, cx), rad = rng.random(2), rng.uniform(1.0, 3.0) / size
        alpha = np.clip((rad - np.hypot(yy - cy, xx - cx)) * size + 0.5, 0, 1)[..., None]
        img = img * (1 - alpha) + _random_colour(rng) * alpha
    return img


def render_sample(class_index: int, rng: np.random.Generator, image_size: int = 64) -> Image.Image:
    """Render one ``image_size`` x ``image_size`` RGB image of class ``class_index`` from ``rng``.

    Pure: the result depends only on the arguments. The nuisances are drawn from ``rng`` before and
    independently of the class, so the same ``rng`` state gives the same colours, pose and texture for
    every class; only the shape differs.
    """
    if not 0 <= class_index < len(SYNTHETIC_CLASSES):
        raise ValueError(f"class_index must be in [0, {len(SYNTHETIC_CLASSES)}), got {class_index}")
    nz = _sample_nuisance(rng)
    alpha = _shape_alpha(class_index, nz, image_size)[..., None]
    img = _background(nz, image_size) * (1 - alpha) + _foreground(nz, image_size) * alpha
    img = _add_distractors(img, nz)
    img = img + np.random.default_rng(nz["noise_seed"]).normal(0, nz["noise"], img.shape)
    return Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------- generation
def _image_name(split: str, class_index: int, i: int) -> str:
    return f"{split}_{class_index:02d}_{i:04d}.JPEG"


def _write_split(
    directory: Path, split: str, num_classes: int, per_class: int, image_size: int, seed: int, quality: int
) -> None:
    """Render and save every image of one split under ``directory/<class_name>/``."""
    for c in range(num_classes):
        class_dir = directory / SYNTHETIC_CLASSES[c]
        class_dir.mkdir(parents=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, SPLIT_IDS[split], c, i])
            render_sample(c, rng, image_size).save(class_dir / _image_name(split, c, i), "JPEG", quality=quality)


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(root: Path, params: dict) -> bool:
    """True when the marker matches ``params`` and every class folder holds the expected number of files."""
    if _read_marker(root) != params:
        return False
    counts = {"train": params["train_per_class"], "val": params["val_per_class"]}
    for split, expected in counts.items():
        for name in SYNTHETIC_CLASSES[: params["num_classes"]]:
            class_dir = root / split / name
            if not class_dir.is_dir() or sum(1 for _ in os.scandir(class_dir)) != expected:
                return False
    return True


def generate_synthetic_dataset(
    root: str | os.PathLike,
    num_classes: int = 10,
    train_per_class: int = 300,
    val_per_class: int = 50,
    image_size: int = 64,
    seed: int = 0,
    quality: int = 90,
) -> Path:
    """Write the synthetic shapes dataset to ``root`` (ImageFolder layout) unless it is already there.

    Creates ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG`` with ``train_per_class`` and
    ``val_per_class`` images per class, then ``root/.tinydino_synthetic.json`` recording the parameters.
    A call whose marker matches and whose folders are complete returns at once without touching a file;
    otherwise ``train/`` and ``val/`` are rendered in a staging folder, moved into place and the marker is
    written last, so an interrupted generation is simply redone. Returns ``root`` as a ``Path``.
    """
    if not 1 <= num_classes <= len(SYNTHETIC_CLASSES):
        raise ValueError(f"num_classes must be in [1, {len(SYNTHETIC_CLASSES)}], got {num_classes}")
    if min(train_per_class, val_per_class) < 0 or image_size < 8 or seed < 0:
        raise ValueError("need train/val_per_class >= 0, image_size >= 8 and seed >= 0")
    root = Path(root)
    params = {
        "format_version": FORMAT_VERSION,
        "num_classes": num_classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "image_size": image_size,
        "seed": seed,
        "quality": quality,
    }
    if _is_complete(root, params):
        return root
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER_NAME).unlink(missing_ok=True)
    staging = root / STAGING_NAME
    shutil.rmtree(staging, ignore_errors=True)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        _write_split(staging / split, split, num_classes, per_class, image_size, seed, quality)
    for split in ("train", "val"):
        shutil.rmtree(root / split, ignore_errors=True)
        os.replace(staging / split, root / split)
    staging.rmdir()
    tmp_marker = root / (MARKER_NAME + ".tmp")
    tmp_marker.write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_marker, root / MARKER_NAME)
    return root
