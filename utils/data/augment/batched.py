"""DINO's multi-crop augmentation on a whole batch of uint8 images at once, on any device.

:class:`BatchedMultiCrop` is the batched counterpart of :class:`utils.data.augment.per_image.DataAugmentationDINO`:
``module(images, seed)`` maps uint8 ``[B, 3, H, W]`` to ``2 + n`` float32 views ``[B, 3, S, S]``, every sample with
its own parameters drawn from the per-image recipe's distributions (:func:`sample_params`,
``utils/data/augment/params.py``; the output is a pure function of images and seed). Per view, in DINO's order:
RandomResizedCrop (torchvision's sampling rule, PIL's bicubic or bilinear resampling with antialiasing, as two 1-D
per-sample matrix products, each pass clipped to [0, 1] for bicubic) with the horizontal flip folded in; colour jitter
(per-sample factors and order, ``utils/data/augment/color.py``); grayscale; Gaussian blur
(``utils/data/augment/blur.py``, torchvision's ``gaussian_blur``: ``2 ceil(3 sigma) + 1`` taps, reflect padding);
solarisation at 128/255; ImageNet normalisation.
For fixed parameters each sample equals torchvision's functional ops applied to it alone, to float rounding
(``tests/data/test_batched_augment.py``); unlike PIL, intermediate results are not rounded to uint8.

Two paths compute the same thing: the tensor path (any device; :func:`apply_view` sorts the samples by
:func:`processing_order` so that every operation works on contiguous slices, and sends all of a view's host-made
operands to the device in one copy, :mod:`utils.data.augment.transfer`) and, on a CPU with Numba, the compiled
kernels of ``utils/data/augment/kernels.py`` from the resize's height pass on. On a CPU the batch is processed in
chunks of :data:`CPU_CHUNK_PIXELS` output pixels with reused working tensors (:class:`Workspace`).

Use (one call per batch)::

    augment = BatchedMultiCrop(MultiCropConfig.from_args(args))
    crops = augment(images, sample_seed(seed, epoch, rank, step))  # list of 2 + n float [B, 3, S, S]
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor, nn

from utils.data.augment import kernels as augment_kernels
from utils.data.augment.blur import blur, blur_kernel_size, blur_radius, gaussian_blur, plan_blur, run_gaussian_blur
from utils.data.augment.color import (
    _grayscale_at,
    color_jitter,
    grayscale,
    plan_color_jitter,
    run_color_jitter,
    shift_hue,
)
from utils.data.augment.config import MultiCropConfig
from utils.data.augment.params import JITTER_OPS, GeneratorLike, as_generator, sample_crop_boxes, sample_params
from utils.data.augment.per_image import IMAGENET_MEAN, IMAGENET_STD
from utils.data.augment.transfer import HostPack, Slot, to_device
from utils.data.augment.workspace import Workspace, sample_indices, scratch

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
#: Output pixels of one view processed together on a CPU (64 global crops of 128 px, 256 local crops of 64 px): the
#: working tensors of a chunk stay in the last-level cache. Other devices: the whole batch at once.
CPU_CHUNK_PIXELS = 64 * 128 * 128


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
    return to_device(torch.stack([weights, weights.flip(1)]).float(), device)


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
    crop = crop if crop.device == device else to_device(crop, device)
    flip = flip if flip.device == device else to_device(flip, device)
    rows = resampling_matrices(crop[:, 0], crop[:, 2], None, height, size, interpolation)  # [B, S, H]
    cols = resampling_matrices(crop[:, 1], crop[:, 3], flip, width, size, interpolation)  # [B, S, W]
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
# Solarisation, normalisation


def _solarize_at(x: Tensor, index: Tensor, threshold: float = SOLARIZE_THRESHOLD) -> Tensor:
    part = x.index_select(0, index)
    return x.index_copy_(0, index, torch.where(part >= threshold, 1 - part, part))


def solarize(x: Tensor, apply: Tensor, threshold: float = SOLARIZE_THRESHOLD) -> Tensor:
    """Where ``apply[b]``, invert the values ``>= threshold`` (``1 - x``; in place)."""
    mask = apply.cpu().numpy()
    return _solarize_at(x, sample_indices(mask, x.device), threshold) if mask.any() else x


def normalize(
    x: Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD, out: Tensor | None = None
) -> Tensor:
    """``(x - mean) / std`` per channel (into ``out`` when given), channel by channel with scalars (see
    :func:`shift_hue`)."""
    out = x if out is None else out
    for channel, (m, s) in enumerate(zip(mean, std)):
        torch.add(torch.tensor(-m / s, dtype=x.dtype), x[:, channel], alpha=1 / s, out=out[:, channel])
    return out


def _processing_order(params: dict[str, np.ndarray], size: int) -> np.ndarray:
    hue_pass = (params["jitter_order"] == JITTER_OPS.index("hue")).astype(np.int8).argmax(axis=1)
    group = np.where(params["jitter"], hue_pass, 4)
    radius = blur_radius(torch.from_numpy(params["sigma"]), size - 1).numpy()
    return np.argsort(group * 16 + np.where(params["blur"], radius, 8), kind="stable")


def processing_order(params: dict[str, Tensor], size: int) -> Tensor:
    """A permutation of the samples of one view (parameters of :func:`sample_params`, output ``size`` px) under
    which :func:`color_jitter` and :func:`blur` do the least work: the jittered samples first, grouped by the pass
    in which their hue turn comes, the others last; within each group the blurred samples first, by kernel radius.
    Then in every jitter pass the samples whose turn is hue form one contiguous run and those blended at most two,
    the blurred samples form at most five runs of near-equal radius, and every operation works on slices (views)
    of the batch instead of gathered copies. Computed on the host (int64 ``[B]`` on the CPU)."""
    host = {key: params[key].detach().cpu().numpy() for key in ("jitter", "jitter_order", "sigma", "blur")}
    return torch.from_numpy(_processing_order(host, size))


def _index_slot(pack: HostPack, mask: np.ndarray) -> Slot | None:
    return pack.add(np.flatnonzero(mask).astype(np.int64)) if mask.any() else None


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
    :func:`uses_compiled_kernels`) instead of tensor operations; same results to float rounding.

    Tensor path: the parameters are read on the host (they live there when drawn from an integer seed; otherwise
    they are copied there once), every operand the device needs (sample order, crop boxes, colour factors, blur
    kernels, sample indices) is packed into one host buffer and sent in one copy (:class:`HostPack`), and no value
    is read back from the device."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images [B, 3, H, W], got shape {tuple(images.shape)}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if uses_compiled_kernels(images.device, compiled):
        return _apply_view_compiled(images, params, size, interpolation, out, ws)
    device, batch = images.device, images.shape[0]
    host = {key: value.detach().cpu().numpy() for key, value in params.items()}
    # work in the order that suits the colour jitter and the blur (images and parameters permuted alike), and put
    # the samples back in their places when writing the result
    perm = _processing_order(host, size)
    sorted_already = bool((perm == np.arange(batch)).all())
    pack = HostPack()
    if not sorted_already:
        host = {key: value[perm] for key, value in host.items()}
        perm_slot, inverse_slot = pack.add(perm.astype(np.int64)), pack.add(np.argsort(perm).astype(np.int64))
    crop_slot, flip_slot = pack.add(host["crop"].astype(np.int64)), pack.add(host["flip"])
    jitter = plan_color_jitter(pack, host["jitter"], host["jitter_factors"], host["jitter_order"], torch.float32)
    gray_slot = _index_slot(pack, host["grayscale"])
    blur_runs = plan_blur(pack, host["blur"], host["sigma"], (batch, 3, size, size), torch.float32, device)
    solarize_slot = _index_slot(pack, host["solarize"])
    operands = pack.send(device)

    if not sorted_already:
        images = images.index_select(0, operands[perm_slot])
    x = resized_crop(images, operands[crop_slot], operands[flip_slot], size, interpolation, ws=ws)
    x = run_color_jitter(x, jitter, operands, ws=ws)
    if gray_slot is not None:
        _grayscale_at(x, operands[gray_slot], ws=ws)
    if blur_runs:
        run_gaussian_blur(x, blur_runs, operands, out=x)
    if solarize_slot is not None:
        _solarize_at(x, operands[solarize_slot])
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if not sorted_already:
        x = torch.index_select(x, 0, operands[inverse_slot], out=out)
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
    counterpart of :class:`utils.data.augment.per_image.DataAugmentationDINO` (same settings, same distributions;
    see the module docstring for the numerical differences). ``images``: uint8 ``[B, 3, H, W]`` on any device.

    Settings: a :class:`~utils.data.augment.config.MultiCropConfig`, or its fields as keywords. ``generator``: a
    :class:`torch.Generator` or an integer seed for the whole batch (e.g.
    ``utils.runtime.rng.sample_seed(seed, epoch, rank, step)``); the output is a pure function of the images and the
    seed (and of the generator's state for a generator).
    ``chunk_size``: samples processed together (default: :data:`CPU_CHUNK_PIXELS` worth on a CPU, the whole batch
    elsewhere); results do not depend on it. ``reuse_buffers``: on a CPU, keep the working tensors between chunks
    and calls (a :class:`Workspace`, about 40 MB at the default sizes; one module per thread then). ``compiled``: on
    a CPU, finish each view (height pass of the resize to normalisation) with the compiled kernels of
    ``utils/data/augment/kernels.py`` (default ``None``: when Numba is installed; ``False``: tensor operations
    only); same results to float rounding.
    """

    def __init__(
        self,
        config: MultiCropConfig | None = None,
        *,
        interpolation: str = "bicubic",
        chunk_size: int | None = None,
        reuse_buffers: bool = True,
        compiled: bool | None = None,
        **settings,
    ):
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.config = MultiCropConfig.coerce(config, **settings)
        self.interpolation = interpolation
        self.chunk_size = chunk_size
        self.reuse_buffers = reuse_buffers
        self.compiled = compiled
        self.workspace = Workspace()

    def view_configs(self) -> list[dict]:
        """Per view: output ``size`` and :func:`sample_params` keywords (scale, blur and solarisation probability, blur
        sigma range)."""
        cfg = self.config
        blur = {"sigma_range": cfg.blur_sigma}
        views = [
            {"size": cfg.global_crop_size, "scale": cfg.global_crops_scale, "blur_prob": 1.0, "solarize_prob": 0.0},
            {"size": cfg.global_crop_size, "scale": cfg.global_crops_scale, "blur_prob": 0.1, "solarize_prob": 0.2},
        ]
        local = {"size": cfg.local_crop_size, "scale": cfg.local_crops_scale, "blur_prob": 0.5, "solarize_prob": 0.0}
        return [view | blur for view in views + [local] * cfg.local_crops_number]

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
        return f"{self.config}, interpolation={self.interpolation!r}"
