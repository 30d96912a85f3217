"""The per-image DINO recipe's per-view probabilities (official ``DataAugmentationDINO``): Gaussian blur with
p 1.0 on the first global view, 0.1 on the second, 0.5 on the local views; solarisation with p 0.2 on the second
global view only.

Blur and solarisation are made visible in the output: PIL's Gaussian blur is replaced by a fill with grey 10 and
solarisation by a fill with 200 (after a blur) or 245 (without). Both come after the colour jitter, so a view whose
every pixel is one of those values tells which of the two ran; a random-noise image never gives a constant view
otherwise."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps

from utils.data.augment.per_image import IMAGENET_MEAN, IMAGENET_STD, DataAugmentationDINO

N = 400


def marker(view: torch.Tensor) -> int | None:
    """The grey level 0..255 of a constant view (de-normalised), None for a non-constant one."""
    pixels = view * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    levels = torch.round(pixels * 255)
    return int(levels.flatten()[0]) if bool((levels == levels.flatten()[0]).all()) else None


@pytest.fixture
def visible_blur_and_solarise(monkeypatch):
    real_filter = Image.Image.filter

    def fill_if_blur(image, kernel):
        if isinstance(kernel, ImageFilter.GaussianBlur):
            return Image.new(image.mode, image.size, (10,) * len(image.getbands()))
        return real_filter(image, kernel)

    def fill_solarise(image, threshold=128):
        blurred = image.getextrema() == ((10, 10),) * len(image.getbands())
        return Image.new(image.mode, image.size, ((200 if blurred else 245),) * len(image.getbands()))

    monkeypatch.setattr(Image.Image, "filter", fill_if_blur)
    monkeypatch.setattr(ImageOps, "solarize", fill_solarise)


def test_blur_and_solarisation_probabilities_per_view(visible_blur_and_solarise):
    random.seed(0)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    augment = DataAugmentationDINO(local_crops_number=2, global_crop_size=16, local_crop_size=8)
    blur = np.zeros(4)  # global 1, global 2, local 1, local 2
    solarise = np.zeros(4)
    for _ in range(N):
        image = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
        for v, view in enumerate(augment(image)):
            level = marker(view)
            blur[v] += level in (10, 200)
            solarise[v] += level in (200, 245)
    # expected counts out of N = 400 (binomial standard deviations: 0.1 -> 6, 0.2 -> 8, 0.5 -> 10)
    assert blur[0] == N
    assert 15 <= blur[1] <= 70
    assert all(140 <= b <= 260 for b in blur[2:])
    assert solarise[0] == 0 and solarise[2] == 0 and solarise[3] == 0
    assert 45 <= solarise[1] <= 120
