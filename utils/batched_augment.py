"""DINO's multi-crop augmentation on a whole batch of images at once (uint8 tensors, any device).

:class:`BatchedMultiCrop` produces what :class:`utils.augment.DataAugmentationDINO` produces for each image — 2 global
crops and ``n`` local crops, each float ``[3, S, S]`` normalised with ImageNet's mean and std — but for a batch
``[B, 3, H, W]`` of decoded uint8 images in one go, every sample with its own random parameters drawn from the same
distributions as the per-image pipeline. Nothing loops over samples: the only Python loops run over the ``2 + n``
views and over the 4 colour-jitter slots. Random parameters are drawn by a separate function (:func:`sample_params`,
one dict of tensors per view) from a :class:`torch.Generator` or an integer seed, so that a batch is a pure function
of (images, seed) and tests can fix parameters; :func:`apply_view` applies them.

Per view, in DINO's order (the per-image pipeline's, see ``utils/augment.py``):

1. **RandomResizedCrop** with torchvision's sampling rule (area fraction uniform in ``scale``, log-uniform aspect
   ratio in [3/4, 4/3], 10 tries, then the centre-crop fallback), vectorised over the batch, and the **horizontal
   flip** (p 0.5) folded into it. The crop + resize + flip of sample ``b`` is ``R_y[b] @ image[b] @ R_x[b]^T`` with
   per-sample 1-D resampling matrices, two batched matrix products for the whole batch.

   *Interpolation.* ``interpolation="bicubic"`` (the default) evaluates PIL's resampling: bicubic kernel with
   ``a = -0.5``, support widened by the scale factor when shrinking (antialiasing), taps outside the crop dropped
   and the remaining weights renormalised. It is what ``torch.nn.functional.interpolate(..., mode="bicubic",
   antialias=True)`` (hence torchvision's tensor ``resized_crop(..., BICUBIC, antialias=True)``) computes on the
   cropped image, to float rounding (~1e-6), and what PIL's ``Image.resize(..., BICUBIC)`` of the official recipe
   computes except that PIL rounds to uint8 after each of its two 1-D passes (differences of 1-2 / 255); the result
   is clamped to [0, 1] as PIL clips overshoots. ``interpolation="bilinear"`` uses the triangle kernel, equal to
   torchvision's tensor ``resized_crop(..., BILINEAR)`` (plain bilinear when enlarging, antialiased when shrinking).
   Sampling inside the crop only, as torchvision does (crop, then resize), is what ``roi_align`` and
   ``grid_sample`` do not do: they blend pixels just outside the crop box into the border rows, and are bilinear
   only (``grid_sample``'s bicubic uses ``a = -0.75`` and no antialiasing). Measured on one CPU core (64 px sources
   → 128 px), the matrix products take about the time of ``roi_align`` / bilinear ``grid_sample`` and half that of
   bicubic ``grid_sample``, so exactness costs nothing. The matrices are dense over the source image (``S x H`` and
   ``S x W`` per sample), which is cheap for TinyImageNet's 64 px images; for large sources (>= 256 px) a
   gather-based resampler would do less work.

2. **Colour jitter** with p 0.8 (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1), the four operations in a
   random order per sample like torchvision's ``ColorJitter`` (a uniformly random permutation). Exact and
   vectorised in 4 passes: in pass ``k`` every sample applies the operation that is ``k``-th in its own order.
   Brightness, contrast and saturation are all blends ``clamp(f * x + (1 - f) * target)`` (target 0, the mean grey
   level, the grey image), computed for the whole batch at once with per-sample factors (factor 1 = identity for the
   samples whose turn is hue or that are not jittered); hue is computed only for the samples whose turn it is, by a
   vectorised RGB → HSV → RGB round trip (torchvision's tensor ``adjust_hue`` formulas). The grey level is
   ``0.2989 R + 0.587 G + 0.114 B`` like torchvision's tensor ops (PIL uses 0.299 / 0.587 / 0.114 in integers, and
   quantises the hue shift to 1/255 of the circle).
3. **Grayscale** with p 0.2 (the same grey level, on the 3 channels).
4. **Gaussian blur** with per-sample sigma uniform in [0.1, 2.0], with p 1.0 on the first global view, 0.1 on the
   second and 0.5 on the local views; only the blurred samples are computed. The per-image pipeline uses PIL's
   ``GaussianBlur(radius)``, whose ``radius`` is the standard deviation (PIL approximates the Gaussian by three
   box blurs whose total variance is ``radius ** 2``, replicating edge pixels). Here: a true Gaussian of that sigma,
   ``kernel_size = 2 * ceil(3 * sigma) + 1`` taps (the ±3 sigma support; 3 to 13 taps), reflect padding — what
   torchvision's ``gaussian_blur(x, kernel_size, sigma)`` computes — as a separable per-sample convolution
   (grouped convolution, one group per sample and channel).
5. **Solarisation** with p 0.2 on the second global view only: values ``>= 128 / 255`` become ``1 - x``.
6. **ImageNet normalisation.**

Everything runs in float32 on the images' device; parameters are drawn on the generator's device (the CPU for an
integer seed), so a seed gives the same parameters on every device. Unlike the PIL pipeline, intermediate results
are not rounded to uint8 after each operation.

Use (training loop, one call per batch; see also ``benchmarks/bench_augment.py``)::

    augment = BatchedMultiCrop(global_crops_scale, local_crops_scale, local_crops_number, 128, 64).to(device)
    images = cache[indices].to(device, non_blocking=True)          # uint8 [B, 3, 64, 64]
    crops = augment(images, sample_seed(seed, epoch, rank, step))  # list of 2 + n float [B, 3, S, S]
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.augment import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "BatchedMultiCrop",
    "apply_view",
    "blur_kernel_size",
    "resampling_matrices",
    "sample_crop_boxes",
    "sample_params",
]

RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_TRIES = 10
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.4, 0.4, 0.2, 0.1
JITTER_P, GRAYSCALE_P, FLIP_P = 0.8, 0.2, 0.5
SIGMA_RANGE = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128 / 255
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
#: Index of each jitter operation in ``params["jitter_factors"]`` and in ``params["jitter_order"]``.
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
INTERPOLATIONS = ("bicubic", "bilinear")
#: Samples processed together on a CPU: keeps the working tensors in cache (and small enough to be recycled by the
#: memory allocator instead of being mapped afresh, page faults and all, at every operation). Other devices: the batch.
CPU_CHUNK = 32
GeneratorLike = torch.Generator | int


def _generator(generator: GeneratorLike) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"expected a torch.Generator or an integer seed, got {type(generator).__name__}")
    return torch.Generator().manual_seed(generator)


def _uniform(shape: tuple[int, ...], low: float, high: float, g: torch.Generator) -> Tensor:
    return torch.rand(shape, generator=g, device=g.device, dtype=torch.float64) * (high - low) + low


def _bernoulli(batch_size: int, p: float, g: torch.Generator) -> Tensor:
    return torch.rand(batch_size, generator=g, device=g.device) < p


def sample_crop_boxes(
    batch_size: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    generator: GeneratorLike,
    ratio: tuple[float, float] = RATIO,
) -> Tensor:
    """RandomResizedCrop boxes ``[B, 4]`` int64 ``(top, left, height, width)``, torchvision's sampling rule for
    every sample at once.

    Each sample tries up to 10 (area fraction uniform in ``scale``, aspect ratio log-uniform in ``ratio``) pairs and
    keeps the first whose rounded box fits the image, then a uniformly random position; a sample with no fitting
    try gets the whole image, or its centred largest crop within ``ratio`` when the image's own ratio is outside.
    """
    g = _generator(generator)
    area = height * width
    target_area = area * _uniform((batch_size, CROP_TRIES), scale[0], scale[1], g)
    log_ratio = _uniform((batch_size, CROP_TRIES), math.log(ratio[0]), math.log(ratio[1]), g)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target_area * aspect)).long()
    h = torch.round(torch.sqrt(target_area / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting try (0 when none fits)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(dim=1)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w, fallback_w)
    h = torch.where(found, h, fallback_h)
    u_top, u_left = torch.rand((2, batch_size), generator=g, device=g.device, dtype=torch.float64)
    top = torch.minimum((u_top * (height - h + 1)).long(), height - h)
    left = torch.minimum((u_left * (width - w + 1)).long(), width - w)
    top = torch.where(found, top, (height - h) // 2)
    left = torch.where(found, left, (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def sample_params(
    batch_size: int,
    generator: GeneratorLike,
    height: int,
    width: int,
    *,
    scale: tuple[float, float],
    blur_prob: float,
    solarize_prob: float = 0.0,
) -> dict[str, Tensor]:
    """Random parameters of one view for ``batch_size`` images of ``height x width``: a dict of tensors on the
    generator's device (the CPU for an integer seed), one row per sample.

    ``crop`` int64 ``[B, 4]`` (top, left, height, width); ``flip`` bool ``[B]``; ``jitter`` bool ``[B]`` (colour
    jitter applied); ``jitter_factors`` float ``[B, 4]`` (brightness, contrast, saturation factors, hue shift;
    drawn for every sample, used where ``jitter``); ``jitter_order`` int64 ``[B, 4]`` (a permutation of
    ``0..3`` = :data:`JITTER_OPS`, applied left to right); ``grayscale``, ``blur``, ``solarize`` bool ``[B]``;
    ``sigma`` float ``[B]`` (blur standard deviation in output pixels, used where ``blur``).
    """
    g = _generator(generator)
    crop = sample_crop_boxes(batch_size, height, width, scale, g)
    flip = _bernoulli(batch_size, FLIP_P, g)
    jitter = _bernoulli(batch_size, JITTER_P, g)
    ranges = [
        (max(0.0, 1 - BRIGHTNESS), 1 + BRIGHTNESS),
        (max(0.0, 1 - CONTRAST), 1 + CONTRAST),
        (max(0.0, 1 - SATURATION), 1 + SATURATION),
        (-HUE, HUE),
    ]
    u = torch.rand((batch_size, 4), generator=g, device=g.device)
    low = torch.tensor([r[0] for r in ranges], device=g.device)
    high = torch.tensor([r[1] for r in ranges], device=g.device)
    factors = low + u * (high - low)
    order = torch.rand((batch_size, 4), generator=g, device=g.device).argsort(dim=1)  # uniform permutations
    grayscale = _bernoulli(batch_size, GRAYSCALE_P, g)
    blur = _bernoulli(batch_size, blur_prob, g)
    sigma = SIGMA_RANGE[0] + torch.rand(batch_size, generator=g, device=g.device) * (SIGMA_RANGE[1] - SIGMA_RANGE[0])
    solarize = _bernoulli(batch_size, solarize_prob, g)
    return {
        "crop": crop,
        "flip": flip,
        "jitter": jitter,
        "jitter_factors": factors,
        "jitter_order": order,
        "grayscale": grayscale,
        "blur": blur,
        "sigma": sigma,
        "solarize": solarize,
    }


# ----------------------------------------------------------------------------------------------------------------
# Crop + resize + flip


def _cubic(t: Tensor, a: float = -0.5) -> Tensor:
    t = t.abs()
    inner = ((a + 2) * t - (a + 3)) * t * t + 1
    outer = (((t - 5) * t + 8) * t - 4) * a
    return torch.where(t < 1, inner, torch.where(t < 2, outer, torch.zeros_like(t)))


def _triangle(t: Tensor) -> Tensor:
    return (1 - t.abs()).clamp(min=0)


@lru_cache(maxsize=32)
def _weight_table(n: int, size: int, interpolation: str, device: torch.device) -> Tensor:
    """``T[flip, length, s, j]`` float32 ``[2, n + 1, size, n + 1]``: weight of source pixel ``j`` of a crop of
    ``length`` pixels (``j < length``; column ``n`` and row ``length = 0`` are zeros) in output pixel ``s`` of its
    ``size``-pixel resize (mirrored along ``s`` when ``flip = 1``), with PIL's rule (support scaled by the shrink
    factor, taps outside the crop dropped, weights renormalised)."""
    kernel = _cubic if interpolation == "bicubic" else _triangle
    length = torch.arange(n + 1, dtype=torch.float64)[:, None, None]
    scale = length / size
    filter_scale = scale.clamp(min=1.0)
    centre = (torch.arange(size, dtype=torch.float64)[None, :, None] + 0.5) * scale
    j = torch.arange(n + 1, dtype=torch.float64)[None, None, :]
    weights = kernel((j + 0.5 - centre) / filter_scale) * (j < length)  # zero beyond the kernel's support
    total = weights.sum(dim=-1, keepdim=True)
    weights = torch.where(total != 0, weights / torch.where(total != 0, total, 1.0), 0.0)
    return torch.stack([weights, weights.flip(1)]).to(device=device, dtype=torch.float32)


def resampling_matrices(
    start: Tensor, length: Tensor, flip: Tensor | None, n: int, size: int, interpolation: str = "bicubic"
) -> Tensor:
    """Per-sample 1-D crop + resize matrices ``[B, size, n]``: row ``s`` of sample ``b`` holds the weights of the
    ``n`` source pixels in output pixel ``s`` of the crop ``[start[b], start[b] + length[b])`` resized to ``size``
    pixels (output order reversed where ``flip[b]``)."""
    table = _weight_table(n, size, interpolation, start.device)
    index = length if flip is None else length + (n + 1) * flip.long()
    rows = table.view(2 * (n + 1), size, n + 1).index_select(0, index)  # [B, size, n + 1]
    j = torch.arange(n, device=start.device)[None, :] - start[:, None]  # source pixel -> position in the crop
    j = torch.where((j >= 0) & (j < length[:, None]), j, n)  # outside the crop -> the zero column
    return rows.gather(2, j[:, None, :].expand(-1, size, -1))


def resized_crop(images: Tensor, crop: Tensor, flip: Tensor, size: int, interpolation: str = "bicubic") -> Tensor:
    """Crop ``crop[b] = (top, left, height, width)`` of every image, resize it to ``size x size`` and mirror it
    where ``flip[b]``; ``images`` uint8 (values scaled to [0, 1]) or float ``[B, C, H, W]`` → float ``[B, C, S, S]``
    (clamped to [0, 1] for bicubic)."""
    _, _, height, width = images.shape
    crop = crop.to(images.device)
    rows = resampling_matrices(crop[:, 0], crop[:, 2], None, height, size, interpolation)
    cols = resampling_matrices(crop[:, 1], crop[:, 3], flip.to(images.device), width, size, interpolation)
    x = images.float()
    if images.dtype == torch.uint8:
        rows = rows * (1 / 255)
    out = torch.matmul(torch.matmul(rows[:, None], x), cols[:, None].transpose(-1, -2))
    return out.clamp_(0, 1) if interpolation == "bicubic" else out


# ----------------------------------------------------------------------------------------------------------------
# Colour


def _gray(x: Tensor) -> Tensor:
    """Grey level ``[B, 1, H, W]`` of RGB ``[B, 3, H, W]`` (torchvision's tensor weights)."""
    r, g, b = x.unbind(dim=1)
    return r.mul(GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(1)


def _indices(mask: Tensor, device: torch.device) -> Tensor:
    """Positions of the true entries of a parameter mask (found where the parameters live, usually the CPU, so
    that an accelerator is not synchronised), on ``device``."""
    return mask.nonzero()[:, 0].to(device)


def shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of RGB ``[B, 3, H, W]`` in [0, 1] by ``shift[b]`` turns, keeping saturation and value:
    torchvision's tensor ``adjust_hue`` (RGB → HSV, ``h = (h + shift) mod 1``, HSV → RGB; ties between maximal
    channels resolved red, then green, as there), rewritten with arithmetic only — on CPUs ``torch.where`` and the
    reductions over the channel axis are an order of magnitude slower than ``+ - * / abs sign clamp floor``.

    Hue in sixths of a turn ``h``: ``(g - b) / C`` where red is the maximum, ``2 + (b - r) / C`` where green is,
    ``4 + (r - g) / C`` where blue is (``C = max - min``, the chroma; 0 for greys). Back to RGB: each channel is
    ``min + C * pure(h)`` with the fully saturated colour of hue ``h``: ``pure = clamp(|h - 3| - 1, 2 - |h - 2|,
    2 - |h - 4|)`` in [0, 1] (the six-sector HSV formula, written without sectors).
    """
    r, g, b = x.unbind(dim=1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    not_r = torch.sign(maxc - r)  # 1 where red is not the maximum, else 0
    only_b = not_r * torch.sign(maxc - g)  # 1 where neither red nor green is
    # h * C = (g - b) + not_r * [(2C + b - r) - (g - b)] + only_b * [(4C + r - g) - (2C + b - r)]
    base = chroma * 2 - (r + g + b)
    hue_c = (g - b).addcmul_(not_r, base.add(b, alpha=3)).addcmul_(only_b, base.add_(r, alpha=3))
    hue = torch.addcdiv((6.0 * shift).to(x.dtype).view(-1, 1, 1), hue_c, chroma.clamp(min=torch.finfo(x.dtype).tiny))
    hue = hue.sub_(torch.floor(hue * (1 / 6)), alpha=6)  # mod 6
    offsets = torch.tensor([3.0, 2.0, 4.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    slopes = torch.tensor([1.0, -1.0, -1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    intercepts = torch.tensor([-1.0, 2.0, 2.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    pure = torch.addcmul(intercepts, (hue.unsqueeze(1) - offsets).abs_(), slopes).clamp_(0, 1)
    return pure.mul_(chroma.unsqueeze(1)).add_(minc.unsqueeze(1))


def color_jitter(x: Tensor, apply: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """Torchvision's ``ColorJitter`` with per-sample factors and order, where ``apply[b]``; ``x`` float
    ``[B, 3, H, W]`` in [0, 1] (modified in place and returned).

    Pass ``k`` applies, to every sample, the operation ``order[b, k]`` (0 brightness, 1 contrast, 2 saturation,
    3 hue): ``clamp(f * x + (1 - f) * target, 0, 1)`` with target 0 / the image's mean grey level / its grey image,
    or the hue rotation. The blend is computed for all samples (factor 1 where the sample's turn is hue or where
    it is not jittered), the hue only for the samples whose turn it is.
    """
    batch, device = x.shape[0], x.device
    for k in range(4):
        op = order[:, k]
        f = factors.gather(1, op[:, None])[:, 0].to(x.dtype)
        blend = apply & (op != 3)
        if bool(blend.any()):
            f_blend = torch.where(blend, f, 1.0)
            # (1 - f) * target = (1 - f) * ([op == saturation] * grey image + [op == contrast] * mean grey level)
            gray_coef = ((op == 2) * (1 - f_blend)).to(device, x.dtype).view(batch, 1, 1, 1)
            mean_coef = ((op == 1) * (1 - f_blend)).to(device, x.dtype).view(batch, 1, 1, 1)
            gray = _gray(x)
            target = torch.addcmul(gray.mean(dim=(2, 3), keepdim=True) * mean_coef, gray, gray_coef)
            f_blend = f_blend.to(device).view(batch, 1, 1, 1)
            x = torch.addcmul(target, x, f_blend, out=x).clamp_(0, 1)
        hue = apply & (op == 3)
        if bool(hue.any()):
            index = _indices(hue, device)
            x.index_copy_(0, index, shift_hue(x.index_select(0, index), f[hue].to(device)))
    return x


def grayscale(x: Tensor, apply: Tensor) -> Tensor:
    """Replace the images where ``apply[b]`` by their grey level on the 3 channels (in place)."""
    if bool(apply.any()):
        index = _indices(apply, x.device)
        x.index_copy_(0, index, _gray(x.index_select(0, index)).expand(-1, 3, -1, -1))
    return x


# ----------------------------------------------------------------------------------------------------------------
# Blur, solarisation


def blur_kernel_size(sigma: Tensor | float) -> Tensor | int:
    """Taps of the Gaussian kernel of standard deviation ``sigma``: ``2 * ceil(3 * sigma) + 1`` (±3 sigma)."""
    if isinstance(sigma, Tensor):
        return 2 * torch.ceil(3 * sigma).long() + 1
    return 2 * math.ceil(3 * sigma) + 1


def blur_radius(sigma: Tensor, max_radius: int) -> Tensor:
    """Kernel radius ``(blur_kernel_size(sigma) - 1) / 2 = ceil(3 sigma)``, at most ``max_radius``."""
    return torch.clamp((blur_kernel_size(sigma) - 1) // 2, max=max_radius)


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Per-sample Gaussian blur of ``x`` float ``[B, C, H, W]``: sample ``b`` convolved with the normalised
    Gaussian of standard deviation ``sigma[b]`` truncated to :func:`blur_kernel_size` taps (radius at most
    ``min(H, W) - 1``), reflect padding — torchvision's ``gaussian_blur(x[b], kernel_size, sigma[b])``.

    Separable: per run of consecutive samples with the same kernel radius (sort the samples by radius for the
    fewest runs, as :func:`apply_view` does), one reflect pad and one grouped convolution (a group per sample and
    channel) along each axis. ``sigma`` may live on the CPU (no synchronisation then).
    """
    batch, channels, height, width = x.shape
    out = torch.empty_like(x)
    if batch == 0:
        return out
    sigma = sigma.detach().to("cpu", torch.float64)
    radius = blur_radius(sigma, min(height, width) - 1)
    values, counts = torch.unique_consecutive(radius, return_counts=True)
    start = 0
    for r, count in zip(values.tolist(), counts.tolist()):
        part = slice(start, start + count)
        start += count
        taps = torch.arange(-r, r + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (taps[None, :] / sigma[part, None]) ** 2)
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(x.device, x.dtype)
        kernel = kernel.repeat_interleave(channels, dim=0)  # one kernel per (sample, channel) group
        groups = count * channels
        padded = F.pad(x[part], (r, r, r, r), mode="reflect").view(1, groups, height + 2 * r, width + 2 * r)
        blurred = F.conv2d(padded, kernel.view(groups, 1, 1, -1), groups=groups)
        blurred = F.conv2d(blurred, kernel.view(groups, 1, -1, 1), groups=groups)
        out[part] = blurred.view(count, channels, height, width)
    return out


def solarize(x: Tensor, apply: Tensor, threshold: float = SOLARIZE_THRESHOLD) -> Tensor:
    """Where ``apply[b]``, invert the values ``>= threshold`` (``1 - x``; in place)."""
    if bool(apply.any()):
        index = _indices(apply, x.device)
        sub = x.index_select(0, index)
        x.index_copy_(0, index, torch.where(sub >= threshold, 1 - sub, sub))
    return x


def apply_view(
    images: Tensor,
    params: dict[str, Tensor],
    size: int,
    interpolation: str = "bicubic",
    mean: Tensor | None = None,
    std: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """One view of every image: crop + resize + flip, colour jitter, grayscale, blur, solarisation, normalisation
    with the parameters of :func:`sample_params`. ``images`` uint8 (or float in [0, 1]) ``[B, 3, H, W]`` →
    float32 ``[B, 3, size, size]`` on the same device (written into ``out`` when given)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images [B, 3, H, W], got shape {tuple(images.shape)}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    device = images.device
    x = resized_crop(images, params["crop"], params["flip"], size, interpolation)
    x = color_jitter(x, params["jitter"], params["jitter_factors"], params["jitter_order"])
    x = grayscale(x, params["grayscale"])
    if bool(params["blur"].any()):
        # the blurred samples, sorted by kernel radius (one convolution per radius)
        blurred = params["blur"].nonzero()[:, 0]
        sigma = params["sigma"][blurred]
        by_radius = torch.argsort(blur_radius(sigma, size - 1), stable=True)
        blurred, sigma = blurred[by_radius].to(device), sigma[by_radius]
        x.index_copy_(0, blurred, gaussian_blur(x.index_select(0, blurred), sigma))
    x = solarize(x, params["solarize"])
    mean = torch.tensor(IMAGENET_MEAN, device=device) if mean is None else mean
    std = torch.tensor(IMAGENET_STD, device=device) if std is None else std
    inv_std = 1 / std.view(1, 3, 1, 1)
    return torch.addcmul(-mean.view(1, 3, 1, 1) * inv_std, x, inv_std, out=x if out is None else out)


class BatchedMultiCrop(nn.Module):
    """DINO multi-crop of a whole batch: ``module(images, seed)`` → list of ``2 + local_crops_number`` float tensors
    ``[B, 3, S, S]`` (``global_crop_size`` for the first two, ``local_crop_size`` for the rest), the batched
    counterpart of :class:`utils.augment.DataAugmentationDINO` (same arguments, same distributions; see the module
    docstring for the few numerical differences). ``images``: uint8 ``[B, 3, H, W]`` on any device.
    ``generator``: a :class:`torch.Generator` or an integer seed for the whole batch (e.g.
    ``utils.reproducibility.sample_seed(seed, epoch, rank, step)``); the output is a pure function of the images
    and the seed (and of the generator's state for a generator).
    """

    def __init__(
        self,
        global_crops_scale: tuple[float, float] = (0.4, 1.0),
        local_crops_scale: tuple[float, float] = (0.08, 0.4),
        local_crops_number: int = 2,
        global_crop_size: int = 128,
        local_crop_size: int = 64,
        interpolation: str = "bicubic",
        chunk_size: int | None = None,
    ):
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = int(local_crops_number)
        self.global_crop_size, self.local_crop_size = int(global_crop_size), int(local_crop_size)
        self.interpolation = interpolation
        self.chunk_size = chunk_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD), persistent=False)

    def view_configs(self) -> list[dict]:
        """Per view: output ``size`` and :func:`sample_params` keywords (scale, blur and solarisation probability)."""
        global_size, local_size = self.global_crop_size, self.local_crop_size
        views = [
            {"size": global_size, "scale": self.global_crops_scale, "blur_prob": 1.0, "solarize_prob": 0.0},
            {"size": global_size, "scale": self.global_crops_scale, "blur_prob": 0.1, "solarize_prob": 0.2},
        ]
        local = {"size": local_size, "scale": self.local_crops_scale, "blur_prob": 0.5, "solarize_prob": 0.0}
        return views + [dict(local) for _ in range(self.local_crops_number)]

    def sample_params(
        self, batch_size: int, generator: GeneratorLike, height: int = 64, width: int = 64
    ) -> list[dict[str, Tensor]]:
        """Random parameters of every view (one :func:`sample_params` dict per view, in output order)."""
        g = _generator(generator)
        return [
            sample_params(batch_size, g, height, width, **{k: v for k, v in cfg.items() if k != "size"})
            for cfg in self.view_configs()
        ]

    def apply(self, images: Tensor, params: list[dict[str, Tensor]]) -> list[Tensor]:
        """The views of ``images`` for given parameters (as returned by :meth:`sample_params`)."""
        configs = self.view_configs()
        if len(params) != len(configs):
            raise ValueError(f"expected parameters for {len(configs)} views, got {len(params)}")
        device, batch = images.device, images.shape[0]
        mean, std = self.mean.to(device), self.std.to(device)
        chunk = self.chunk_size or (CPU_CHUNK if device.type == "cpu" else batch)
        outputs = []
        for p, cfg in zip(params, configs, strict=True):
            out = torch.empty(batch, 3, cfg["size"], cfg["size"], device=device)
            for start in range(0, batch, chunk):  # chunks of samples, each processed at once
                part = slice(start, start + chunk)
                apply_view(
                    images[part],
                    {k: v[part] for k, v in p.items()},
                    cfg["size"],
                    self.interpolation,
                    mean,
                    std,
                    out[part],
                )
            outputs.append(out)
        return outputs

    def forward(self, images: Tensor, generator: GeneratorLike) -> list[Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images [B, 3, H, W], got shape {tuple(images.shape)}")
        params = self.sample_params(images.shape[0], generator, images.shape[2], images.shape[3])
        return self.apply(images, params)

    def extra_repr(self) -> str:
        return (
            f"global_crops_scale={self.global_crops_scale}, local_crops_scale={self.local_crops_scale}, "
            f"local_crops_number={self.local_crops_number}, global_crop_size={self.global_crop_size}, "
            f"local_crop_size={self.local_crop_size}, interpolation={self.interpolation!r}"
        )
