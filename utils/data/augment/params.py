"""Random parameters of DINO's multi-crop for a whole batch: one draw per sample and view, from one generator.

A batch's parameters are a pure function of (batch size, image size, seed) that tests can draw, inspect and fix;
``utils/data/augment/batched.py`` applies them. The distributions are those of the per-image pipeline
(``utils/data/augment/per_image.py``): torchvision's RandomResizedCrop rule, flip p 0.5, colour jitter p 0.8
(0.4, 0.4, 0.2, 0.1) in a random order, grayscale p 0.2, Gaussian-blur sigma in [0.1, 2], solarisation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_TRIES = 10
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.4, 0.4, 0.2, 0.1
JITTER_P, GRAYSCALE_P, FLIP_P = 0.8, 0.2, 0.5
SIGMA_RANGE = (0.1, 2.0)
#: Index of each jitter operation in ``params["jitter_factors"]`` and in ``params["jitter_order"]``.
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
GeneratorLike = torch.Generator | int


def as_generator(generator: GeneratorLike) -> torch.Generator:
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
    g = as_generator(generator)
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
    sigma_range: tuple[float, float] = SIGMA_RANGE,
) -> dict[str, Tensor]:
    """Random parameters of one view for ``batch_size`` images of ``height x width``: a dict of tensors on the
    generator's device (the CPU for an integer seed), one row per sample.

    ``crop`` int64 ``[B, 4]`` (top, left, height, width); ``flip`` bool ``[B]``; ``jitter`` bool ``[B]`` (colour
    jitter applied); ``jitter_factors`` float ``[B, 4]`` (brightness, contrast, saturation factors, hue shift;
    drawn for every sample, used where ``jitter``); ``jitter_order`` int64 ``[B, 4]`` (a permutation of
    ``0..3`` = :data:`JITTER_OPS`, applied left to right); ``grayscale``, ``blur``, ``solarize`` bool ``[B]``;
    ``sigma`` float ``[B]`` (blur standard deviation in output pixels, uniform in ``sigma_range``, used where
    ``blur``).
    """
    g = as_generator(generator)
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
    # low + u * (high - low) in float32, column by column with scalars (no host tensor to move to the device)
    bounds = [(np.float32(low), np.float32(np.float32(high) - np.float32(low))) for low, high in ranges]
    factors = torch.stack([u[:, i] * float(span) + float(low) for i, (low, span) in enumerate(bounds)], dim=1)
    order = torch.rand((batch_size, 4), generator=g, device=g.device).argsort(dim=1)  # uniform permutations
    grayscale = _bernoulli(batch_size, GRAYSCALE_P, g)
    blur = _bernoulli(batch_size, blur_prob, g)
    low, high = sigma_range
    sigma = low + torch.rand(batch_size, generator=g, device=g.device) * (high - low)
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
