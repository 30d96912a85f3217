"""DINO's multi-crop augmentation on a whole batch of images at once (uint8 tensors, any device).

:class:`BatchedMultiCrop` produces what :class:`utils.data.augment.per_image.DataAugmentationDINO` produces for each image — 2 global
crops and ``n`` local crops, each float ``[3, S, S]`` normalised with ImageNet's mean and std — but for a batch
``[B, 3, H, W]`` of decoded uint8 images in one go, every sample with its own random parameters drawn from the same
distributions as the per-image pipeline. Nothing loops over samples: the only Python loops run over the ``2 + n``
views and over the 4 colour-jitter slots. Random parameters are drawn by a separate function
(:func:`sample_params` in ``utils/data/augment/params.py``, one dict of tensors per view) from a :class:`torch.Generator`
or an integer seed, so that a batch is a pure function of (images, seed) and tests can fix parameters;
:func:`apply_view` applies them.

Per view, in DINO's order (the per-image pipeline's, see ``utils/data/augment/per_image.py``):

1. **RandomResizedCrop** with torchvision's sampling rule (area fraction uniform in ``scale``, log-uniform aspect
   ratio in [3/4, 4/3], 10 tries, then the centre-crop fallback), vectorised over the batch, and the **horizontal
   flip** (p 0.5) folded into it. The crop + resize + flip of sample ``b`` is ``R_y[b] @ image[b] @ R_x[b]^T`` with
   per-sample 1-D resampling matrices, two batched matrix products for the whole batch.

   *Interpolation.* The matrices hold PIL's resampling weights (the official recipe resizes with PIL): source
   pixels at ``(s + 0.5) * scale``, kernel support widened by the shrink factor when shrinking (antialiasing), taps
   outside the crop dropped and the remaining weights renormalised; width pass first, then height. With
   ``interpolation="bicubic"`` (the default: PIL's bicubic, ``a = -0.5``) each pass is clipped to [0, 1] as PIL
   clips it; the result equals PIL's ``crop(...).resize(..., BICUBIC)`` up to PIL's rounding to uint8 (measured:
   within 1.1 / 255, 0.3 / 255 on average), and equals torchvision's tensor ``resize(..., BICUBIC,
   antialias=True)`` (``interpolate(mode="bicubic", antialias=True)``, PIL's kernel too) applied one axis at a time
   with the same clipping, to float rounding (~1e-6). Without the intermediate clip (a single 2-D torchvision
   resize) bicubic overshoots at sharp edges make up to ~7 / 255 of difference with PIL. ``"bilinear"`` uses the
   triangle kernel: equal to PIL's BILINEAR up to rounding and to torchvision's tensor ``resized_crop(...,
   BILINEAR, antialias=True)`` to float rounding (plain bilinear when enlarging). ``roi_align`` and ``grid_sample``
   were the alternatives considered: both are bilinear only (``grid_sample``'s bicubic uses ``a = -0.75`` and no
   antialiasing), neither antialiases when shrinking, and both blend pixels just outside the crop box into its
   border rows (torchvision and PIL crop first, then resize), up to 0.57 of the value range off on noise images;
   measured on one (shared) CPU core, 32 crops of 64 px images to 128 px, interleaved: matrix products 281 µs per
   crop bicubic (235 bilinear) vs ``roi_align`` 441, ``grid_sample`` 387 bilinear / 704 bicubic — exactness costs
   nothing.
   The matrices are dense over the source image (``S x H`` and ``S x W`` per sample): about 4.7 M multiply-adds
   per 128 px view of a 64 px image, at the speed of large matrix products. A banded variant (blocks of 32 output
   rows times the ~20 source rows they read, a third of the arithmetic) was measured no faster at these sizes (its
   many small matrix products run far slower); the compiled CPU kernels (below) do the height pass banded, one
   loop over each output row's nonzero weights, which is faster. For large sources (>= 256 px) a banded / gather
   resampler would win on other devices too.

2. **Colour jitter** with p 0.8 (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1), the four operations in a
   random order per sample like torchvision's ``ColorJitter`` (a uniformly random permutation). Exact and
   vectorised in 4 passes: in pass ``k`` every sample applies the operation that is ``k``-th in its own order.
   Brightness, contrast and saturation are blends ``clamp(f * x + (1 - f) * target)`` (target 0, the mean grey
   level, the grey image), computed as ``clamp(f x + t)`` with one per-sample product and sum over the channels
   (``utils/data/augment/color.py``). Hue is computed only for the samples whose turn it is, RGB → HSV → RGB with
   torchvision's tensor formulas rewritten without branches (:func:`shift_hue`). The grey level is
   ``0.2989 R + 0.587 G + 0.114 B`` as in torchvision's tensor ops (PIL: 0.299 / 0.587 / 0.114 in integer
   arithmetic; PIL's hue shift is also quantised to 1/255 of a turn and its results rounded to uint8 after every
   operation).
3. **Grayscale** with p 0.2 (the same grey level, on the 3 channels).
4. **Gaussian blur** with per-sample sigma uniform in [0.1, 2.0], with p 1.0 on the first global view, 0.1 on the
   second and 0.5 on the local views; only the blurred samples are computed. The per-image pipeline uses PIL's
   ``GaussianBlur(radius)``, whose ``radius`` is the standard deviation: PIL approximates the Gaussian by three
   successive box blurs whose total variance is ``radius ** 2``, replicating the edge pixels. Here: a true Gaussian
   of that sigma truncated at ±3 sigma, ``kernel_size = 2 * ceil(3 * sigma) + 1`` taps (3 to 13), reflect padding —
   exactly torchvision's ``gaussian_blur(x, kernel_size, sigma)`` — as a separable per-sample convolution: the
   samples sorted by kernel radius, grouped convolutions (a group per sample and channel) along each axis.
5. **Solarisation** with p 0.2 on the second global view only: values ``>= 128 / 255`` become ``1 - x`` (PIL's
   ``solarize`` at threshold 128).
6. **ImageNet normalisation.**

Everything runs in float32 on the images' device; parameters are drawn on the generator's device (the CPU for an
integer seed), so a seed gives the same parameters on every device, and the masks that pick samples are read there
(no accelerator synchronisation). For fixed parameters every sample equals torchvision's functional ops applied to
it one by one (to ~1e-6; ``tests/data/test_batched_augment.py``). Unlike the PIL pipeline, intermediate results are not
rounded to uint8 after each operation.

*Order of work.* :func:`apply_view` first sorts the samples (images and parameters alike, a cheap copy of the uint8
sources) by :func:`processing_order`: jittered samples grouped by the pass of their hue turn, and within each group
the blurred ones by kernel radius. Every jitter pass then touches one contiguous run of hue samples and at most
two runs of blended ones, the blur a few runs of near-equal radius, all as slices (views) of the batch, while the
samples left alone are not touched; the last step writes each sample back to its place (one gather into the
output) before normalising.

*Compiled CPU kernels.* On a CPU, by default (when Numba is installed), everything after the resize's width pass —
its height pass (only the nonzero weights of each output row: 4 source rows when enlarging, not all of them) and
steps 2 to 6 — runs as one compiled loop over the samples (``utils/data/augment/kernels.py``): each sample's pixels stay
in the cache from the height pass to the normalised output, each sample applies its own jitter order, and no
sorting or gathering is needed. Same formulas in float32, same results to float rounding (tests run both paths
against torchvision); about 2.7x the tensor path's images/s for the whole pipeline (``benchmarks/bench_augment.py``).
``compiled=False`` (and every other device) uses the tensor operations described here.

*CPU speed (tensor path).* On a CPU each view is processed in chunks of :data:`CPU_CHUNK_PIXELS` output pixels
(64 global crops) whose working tensors are kept in a :class:`Workspace` (``utils/data/augment/workspace.py``) between
chunks and calls, because fresh multi-megabyte tensors cost page faults comparable to the arithmetic (see also
``utils/runtime/host_memory.py``); per-channel operations use scalars, per-sample factors are applied as in-place products
(a fused ``addcmul`` with per-sample operands is several times slower), and the hue avoids ``torch.where`` and
channel reductions — both an order of magnitude slower than plain arithmetic in PyTorch's CPU kernels. The
per-chunk plan (which samples each pass touches) is made on the host with NumPy. See
``benchmarks/bench_augment.py`` for the comparison with the per-image pipeline.

Use (training loop, one call per batch; see also ``benchmarks/bench_augment.py``)::

    augment = BatchedMultiCrop(global_crops_scale, local_crops_scale, local_crops_number, 128, 64)
    images = cache[indices].to(device, non_blocking=True)          # uint8 [B, 3, 64, 64], decoded once
    crops = augment(images, sample_seed(seed, epoch, rank, step))  # list of 2 + n float [B, 3, S, S]
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.data.augment import kernels as augment_kernels
from utils.data.augment.per_image import IMAGENET_MEAN, IMAGENET_STD
from utils.data.augment.params import JITTER_OPS, GeneratorLike, as_generator, sample_crop_boxes, sample_params
from utils.data.augment.workspace import Workspace, contiguous_runs, sample_indices, scratch
from utils.data.augment.color import color_jitter, grayscale, shift_hue

__all__ = [
    "BatchedMultiCrop",
    "Workspace",
    "apply_view",
    "blur",
    "blur_kernel_size",
    "color_jitter",
    "gaussian_blur",
    "grayscale",
    "normalize",
    "processing_order",
    "resampling_matrices",
    "resize_width",
    "resized_crop",
    "sample_crop_boxes",
    "sample_params",
    "shift_hue",
    "solarize",
    "uses_compiled_kernels",
]

SOLARIZE_THRESHOLD = 128 / 255
INTERPOLATIONS = ("bicubic", "bilinear")
#: Output pixels of one view processed together on a CPU (64 global crops of 128 px, 256 local crops of 64 px): large
#: enough that the per-operation cost of the few hundred tensor operations of a chunk is small, small enough for
#: the working tensors to stay in the last-level cache (measured: 4x this is no faster, a quarter 10-30% slower).
#: Other devices: the whole batch at once.
CPU_CHUNK_PIXELS = 64 * 128 * 128
#: Padded input of one blur convolution on a CPU (samples at a time): measured fastest around the L2 cache size.
CONV_CHUNK_BYTES = 1 << 20


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


def resize_width(
    images: Tensor, crop: Tensor, flip: Tensor, size: int, interpolation: str = "bicubic", ws: Workspace | None = None
) -> tuple[Tensor, Tensor]:
    """First half of :func:`resized_crop`: the crop + resize + flip along the width, and the height pass's matrices.

    Returns ``mid`` float32 ``[B, H, C, S]`` (the source rows resampled to ``size`` columns, clipped to [0, 1] for
    bicubic; laid out row by row so that the height pass combines whole rows of all channels) and ``rows``
    float32 ``[B, S, H]`` (per-sample height resampling matrices, see :func:`resampling_matrices`)."""
    batch, channels, height, width = images.shape
    device = images.device
    crop = crop.to(device)
    rows = resampling_matrices(crop[:, 0], crop[:, 2], None, height, size, interpolation)  # [B, S, H]
    cols = resampling_matrices(crop[:, 1], crop[:, 3], flip.to(device), width, size, interpolation)  # [B, S, W]
    if images.dtype == torch.uint8:
        cols = cols.mul_(1 / 255)
    # one product per sample, [H C, W] @ [W, S], on the source laid out row by row (h, c, w), so that the height
    # pass is one product per sample too, [S, H] @ [H, C S] (larger and faster than one per channel). Clipped to
    # [0, 1] after each pass as PIL does (bicubic overshoots; the bilinear weights are convex).
    source = scratch(ws, "source", (batch, height, channels, width), rows).copy_(images.permute(0, 2, 1, 3))
    mid = scratch(ws, "resize_mid", (batch, height, channels, size), rows)
    torch.bmm(source.view(batch, height * channels, width), cols.transpose(1, 2), out=mid.view(batch, -1, size))
    if interpolation == "bicubic":
        mid.clamp_(0, 1)
    return mid, rows


def resized_crop(
    images: Tensor,
    crop: Tensor,
    flip: Tensor,
    size: int,
    interpolation: str = "bicubic",
    out: Tensor | None = None,
    ws: Workspace | None = None,
) -> Tensor:
    """Crop ``crop[b] = (top, left, height, width)`` of every image, resize it to ``size x size`` and mirror it
    where ``flip[b]``; ``images`` uint8 (values scaled to [0, 1]) or float ``[B, C, H, W]`` → float32
    ``[B, C, S, S]``, into ``out`` when given. Two 1-D passes, width then height, each clipped to [0, 1] for bicubic
    (PIL's order and clipping)."""
    batch, channels = images.shape[:2]
    mid, rows = resize_width(images, crop, flip, size, interpolation, ws)
    # along the height: [S, H] @ [H, C S] per sample; the result, laid out (row, channel, column), is put in
    # channel-first order by the last clip or copy
    product = torch.bmm(
        rows,
        mid.view(batch, -1, channels * size),
        out=scratch(ws, "resize_product", (batch, size, channels * size), rows),
    )
    product = product.view(batch, size, channels, size).permute(0, 2, 1, 3)
    out = scratch(ws, "view", (batch, channels, size, size), rows) if out is None else out
    return torch.clamp(product, 0, 1, out=out) if interpolation == "bicubic" else out.copy_(product)


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


def gaussian_blur(x: Tensor, sigma: Tensor, out: Tensor | None = None, max_samples: int | None = None) -> Tensor:
    """Per-sample Gaussian blur of ``x`` float ``[B, C, H, W]``: sample ``b`` convolved with the normalised
    Gaussian of standard deviation ``sigma[b]`` truncated to :func:`blur_kernel_size` taps (radius at most
    ``min(H, W) - 1``), reflect padding — torchvision's ``gaussian_blur(x[b], kernel_size, sigma[b])``.

    Separable: one reflect pad and one grouped convolution (a group per sample and channel) along each axis, per
    run of at most ``max_samples`` consecutive samples (all at once by default), with the largest kernel radius of
    the run (zero taps beyond each sample's own radius): sort the samples by radius for the fewest zero taps, as
    :func:`blur` does. ``out`` may be ``x`` (each run is padded, i.e. copied, before its result is written).
    ``sigma`` may live on the CPU (no synchronisation then).
    """
    batch, channels, height, width = x.shape
    out = torch.empty_like(x) if out is None else out
    sigma = sigma.detach().to("cpu", torch.float64)
    radius = blur_radius(sigma, min(height, width) - 1)
    step = max_samples or max(batch, 1)
    for start in range(0, batch, step):
        part = slice(start, start + step)
        count, r = len(radius[part]), int(radius[part].max())
        taps = torch.arange(-r, r + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (taps[None, :] / sigma[part, None]) ** 2) * (taps.abs() <= radius[part, None])
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(x.device, x.dtype)
        kernel = kernel.repeat_interleave(channels, dim=0)  # one kernel per (sample, channel) group
        groups = count * channels
        padded = F.pad(x[part], (r, r, r, r), mode="reflect").view(1, groups, height + 2 * r, width + 2 * r)
        blurred = F.conv2d(padded, kernel.view(groups, 1, 1, -1), groups=groups)
        blurred = F.conv2d(blurred, kernel.view(groups, 1, -1, 1), groups=groups)
        out[part] = blurred.view(count, channels, height, width)
    return out


def blur(x: Tensor, apply: Tensor, sigma: Tensor) -> Tensor:
    """Gaussian-blur the images where ``apply[b]`` with standard deviation ``sigma[b]`` (in place), one
    :func:`gaussian_blur` per contiguous run of blurred samples: fastest when the samples are sorted by kernel radius
    within each run (:func:`processing_order`)."""
    apply = apply.cpu().numpy()
    if not apply.any():
        return x
    # on a CPU, convolutions over ~1 MB of padded input at a time run fastest (cache-resident)
    padded_bytes = x.shape[1] * (x.shape[2] + 12) * (x.shape[3] + 12) * x.element_size()
    max_samples = max(1, CONV_CHUNK_BYTES // padded_bytes) if x.device.type == "cpu" else None
    for start, stop in contiguous_runs(apply):
        part = x[start:stop]
        gaussian_blur(part, sigma[start:stop], out=part, max_samples=max_samples)
    return x


def solarize(x: Tensor, apply: Tensor, threshold: float = SOLARIZE_THRESHOLD) -> Tensor:
    """Where ``apply[b]``, invert the values ``>= threshold`` (``1 - x``; in place)."""
    if bool(apply.any()):
        index = sample_indices(apply, x.device)
        part = x.index_select(0, index)
        x.index_copy_(0, index, torch.where(part >= threshold, 1 - part, part))
    return x


def normalize(
    x: Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD, out: Tensor | None = None
) -> Tensor:
    """``(x - mean) / std`` per channel (into ``out`` when given), channel by channel with scalars (see
    :func:`shift_hue`)."""
    out = x if out is None else out
    for channel, (m, s) in enumerate(zip(mean, std)):
        torch.add(torch.tensor(-m / s, dtype=x.dtype), x[:, channel], alpha=1 / s, out=out[:, channel])
    return out


def processing_order(params: dict[str, Tensor], size: int) -> Tensor:
    """A permutation of the samples of one view (parameters of :func:`sample_params`, output ``size`` px) under
    which :func:`color_jitter` and :func:`blur` do the least work: the jittered samples first, grouped by the pass
    in which their hue turn comes, the others last; within each group the blurred samples first, by kernel radius.
    Then in every jitter pass the samples whose turn is hue form one contiguous run and those blended at most two,
    the blurred samples form at most five runs of near-equal radius, and every operation works on slices (views)
    of the batch instead of gathered copies."""
    hue_pass = (params["jitter_order"] == JITTER_OPS.index("hue")).to(torch.int8).argmax(dim=1)
    group = torch.where(params["jitter"], hue_pass, 4)
    radius = blur_radius(params["sigma"], size - 1)
    return torch.argsort(group * 16 + torch.where(params["blur"], radius, 8), stable=True)


def apply_view(
    images: Tensor,
    params: dict[str, Tensor],
    size: int,
    interpolation: str = "bicubic",
    out: Tensor | None = None,
    ws: Workspace | None = None,
    compiled: bool | None = None,
) -> Tensor:
    """One view of every image: crop + resize + flip, colour jitter, grayscale, blur, solarisation, normalisation
    with the parameters of :func:`sample_params`. ``images`` uint8 (or float in [0, 1]) ``[B, 3, H, W]`` →
    float32 ``[B, 3, size, size]`` on the same device (written into ``out`` when given; ``ws`` holds the working
    tensors, see :class:`Workspace`). ``compiled``: on a CPU, do everything after the resize's width pass with the
    compiled kernels of ``utils/data/augment/kernels.py`` (``None``: when Numba is installed; see
    :func:`uses_compiled_kernels`) instead of tensor operations; same results to float rounding."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images [B, 3, H, W], got shape {tuple(images.shape)}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if uses_compiled_kernels(images.device, compiled):
        return _apply_view_compiled(images, params, size, interpolation, out, ws)
    # work in the order that suits the colour jitter and the blur (images and parameters permuted alike), and put
    # the samples back in their places when writing the result
    perm = processing_order(params, size)
    sorted_already = bool((perm == torch.arange(len(perm), device=perm.device)).all())
    if not sorted_already:
        params = {key: value[perm] for key, value in params.items()}
        images = images.index_select(0, perm.to(images.device))
    x = resized_crop(images, params["crop"], params["flip"], size, interpolation, ws=ws)
    x = color_jitter(x, params["jitter"], params["jitter_factors"], params["jitter_order"], ws=ws)
    x = grayscale(x, params["grayscale"], ws=ws)
    x = blur(x, params["blur"], params["sigma"])
    x = solarize(x, params["solarize"])
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if not sorted_already:
        x = torch.index_select(x, 0, torch.argsort(perm).to(x.device), out=out)
    return normalize(x, out=out)


def uses_compiled_kernels(device: torch.device, compiled: bool | None = None) -> bool:
    """Whether :func:`apply_view` finishes a view with the compiled CPU kernels: on a CPU when ``compiled`` is true
    or ``None`` (the default) and Numba is installed; never on other devices. ``compiled=True`` without Numba is an
    error that says what to install."""
    if compiled and not augment_kernels.AVAILABLE:
        raise RuntimeError("the compiled augmentation kernels need Numba: pip install numba (or pass compiled=False)")
    return torch.device(device).type == "cpu" and augment_kernels.AVAILABLE and compiled is not False


def _apply_view_compiled(
    images: Tensor, params: dict[str, Tensor], size: int, interpolation: str, out: Tensor | None, ws: Workspace | None
) -> Tensor:
    """:func:`apply_view` on a CPU: the batched resize along the width (:func:`resize_width`), then one compiled
    pass per sample for the rest, from the height pass to the normalisation (in the samples' own order: no
    sorting needed)."""
    mid, rows = resize_width(images, params["crop"], params["flip"], size, interpolation, ws)
    target = out if out is not None and out.is_contiguous() else torch.empty(mid.shape[0], 3, size, size)
    host_params = {key: value.detach().cpu().numpy() for key, value in params.items()}
    augment_kernels.finish_views(
        mid.numpy(),
        rows.numpy(),
        target.numpy(),
        host_params,
        clip=interpolation == "bicubic",
        threshold=SOLARIZE_THRESHOLD,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    return out.copy_(target) if out is not None and target is not out else target


class BatchedMultiCrop(nn.Module):
    """DINO multi-crop of a whole batch: ``module(images, seed)`` → list of ``2 + local_crops_number`` float tensors
    ``[B, 3, S, S]`` (``global_crop_size`` for the first two, ``local_crop_size`` for the rest), the batched
    counterpart of :class:`utils.data.augment.per_image.DataAugmentationDINO` (same arguments, same distributions; see the module
    docstring for the few numerical differences). ``images``: uint8 ``[B, 3, H, W]`` on any device.
    ``generator``: a :class:`torch.Generator` or an integer seed for the whole batch (e.g.
    ``utils.runtime.rng.sample_seed(seed, epoch, rank, step)``); the output is a pure function of the images
    and the seed (and of the generator's state for a generator).

    ``chunk_size``: samples processed together (default: :data:`CPU_CHUNK_PIXELS` worth on a CPU, the whole batch
    elsewhere);
    results do not depend on it. ``reuse_buffers``: on a CPU, keep the working tensors between chunks and calls
    (a :class:`Workspace`, about 40 MB at the default sizes; one module per thread then). ``compiled``: on a CPU,
    finish each view (height pass of the resize to normalisation) with the compiled kernels of
    ``utils/data/augment/kernels.py``
    (default ``None``: when Numba is installed; ``False``: tensor operations only); same results to float rounding,
    about 2.7x as fast (``benchmarks/bench_augment.py``).
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
        reuse_buffers: bool = True,
        compiled: bool | None = None,
    ):
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = int(local_crops_number)
        self.global_crop_size, self.local_crop_size = int(global_crop_size), int(local_crop_size)
        self.interpolation = interpolation
        self.chunk_size = chunk_size
        self.reuse_buffers = reuse_buffers
        self.compiled = compiled
        self.workspace = Workspace()

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
        g = as_generator(generator)
        return [
            sample_params(batch_size, g, height, width, **{k: v for k, v in cfg.items() if k != "size"})
            for cfg in self.view_configs()
        ]

    def apply(self, images: Tensor, params: list[dict[str, Tensor]], out: list[Tensor] | None = None) -> list[Tensor]:
        """The views of ``images`` for given parameters (as returned by :meth:`sample_params`), written into ``out``
        (float32 tensors of the output shapes, e.g. the previous batch's once consumed) when given."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images [B, 3, H, W], got shape {tuple(images.shape)}")
        configs = self.view_configs()
        if len(params) != len(configs):
            raise ValueError(f"expected parameters for {len(configs)} views, got {len(params)}")
        device, batch = images.device, images.shape[0]
        shapes = [(batch, 3, cfg["size"], cfg["size"]) for cfg in configs]
        if out is None:
            out = [torch.empty(shape, device=device) for shape in shapes]
        elif [tuple(o.shape) for o in out] != shapes or any(
            o.dtype != torch.float32 or o.device != device or not o.is_contiguous() for o in out
        ):
            raise ValueError(f"out must be contiguous float32 tensors of shapes {shapes} on {device}")
        on_cpu = device.type == "cpu"
        ws = self.workspace if on_cpu and self.reuse_buffers else None
        for p, cfg, view_out in zip(params, configs, out, strict=True):
            chunk = self.chunk_size or (max(1, CPU_CHUNK_PIXELS // cfg["size"] ** 2) if on_cpu else max(batch, 1))
            for start in range(0, batch, chunk):  # chunks of samples, each processed at once
                part = slice(start, start + chunk)
                chunk_params = {k: v[part] for k, v in p.items()}
                args = (cfg["size"], self.interpolation, view_out[part], ws, self.compiled)
                apply_view(images[part], chunk_params, *args)
        return out

    def forward(self, images: Tensor, generator: GeneratorLike, out: list[Tensor] | None = None) -> list[Tensor]:
        """Draw the parameters of every view from ``generator`` (or an integer seed) and apply them (see
        :meth:`apply` for ``out``)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images [B, 3, H, W], got shape {tuple(images.shape)}")
        params = self.sample_params(images.shape[0], generator, images.shape[2], images.shape[3])
        return self.apply(images, params, out)

    def extra_repr(self) -> str:
        return (
            f"global_crops_scale={self.global_crops_scale}, local_crops_scale={self.local_crops_scale}, "
            f"local_crops_number={self.local_crops_number}, global_crop_size={self.global_crop_size}, "
            f"local_crop_size={self.local_crop_size}, interpolation={self.interpolation!r}"
        )
