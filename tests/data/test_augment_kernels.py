"""Compiled CPU kernels of the batched augmentation (utils/data/augment/kernels.py): each operation against
torchvision's functional op on one image, the whole view against the tensor path, and when they are used."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from tests.data.test_batched_augment import hue_test_images
from utils.data.augment import batched as batched_augment
from utils.data.augment import kernels as augment_kernels
from utils.data.augment.batched import SOLARIZE_THRESHOLD, BatchedMultiCrop, apply_view, sample_params
from utils.data.augment.per_image import IMAGENET_MEAN, IMAGENET_STD

pytestmark = pytest.mark.skipif(not augment_kernels.AVAILABLE, reason="the compiled kernels need numba")


def finish(x: torch.Tensor, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **params) -> torch.Tensor:
    """:func:`augment_kernels.finish_views` on ``x`` ``[B, 3, H, W]`` (after an identity height pass), every
    operation off unless given in ``params`` (host values per sample), identity normalisation unless given."""
    batch = x.shape[0]
    host = {
        "jitter": np.zeros(batch, bool),
        "jitter_factors": np.ones((batch, 4), np.float32),
        "jitter_order": np.tile(np.arange(4), (batch, 1)),
        "grayscale": np.zeros(batch, bool),
        "blur": np.zeros(batch, bool),
        "sigma": np.ones(batch, np.float32),
        "solarize": np.zeros(batch, bool),
    }
    host.update({key: np.asarray(value) for key, value in params.items()})
    height = x.shape[2]
    mid = x.permute(0, 2, 1, 3).contiguous()  # the width pass's layout [B, H, 3, W]
    identity = torch.eye(height).expand(batch, -1, -1).contiguous()  # a height pass that changes nothing
    out = torch.full_like(x, float("nan"))
    options = {"clip": True, "threshold": SOLARIZE_THRESHOLD, "mean": mean, "std": std}
    augment_kernels.finish_views(mid.numpy(), identity.numpy(), out.numpy(), host, **options)
    return out


def only_op(op: int, factor: float, batch: int) -> dict:
    """Jitter parameters that apply operation ``op`` (0 brightness .. 3 hue) with ``factor``, the others as
    identities (factor 1, hue shift 0)."""
    factors = np.ones((batch, 4), np.float32)
    factors[:, 3] = 0.0
    factors[:, op] = factor
    order = np.tile(np.array([op] + [k for k in range(4) if k != op]), (batch, 1))
    return {"jitter": np.ones(batch, bool), "jitter_factors": factors, "jitter_order": order}


@pytest.mark.parametrize("shift", [-0.5, -0.1, -0.03, 0.0, 0.07, 0.1, 0.5])
def test_hue_matches_torchvision(shift):
    x = hue_test_images()
    ours = finish(x, **only_op(3, shift, 5))
    for b in range(5):
        torch.testing.assert_close(ours[b], TF.adjust_hue(x[b], shift), atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    ("op", "reference"), [(0, TF.adjust_brightness), (1, TF.adjust_contrast), (2, TF.adjust_saturation)]
)
@pytest.mark.parametrize("factor", [0.0, 0.6, 1.0, 1.4])
def test_blends_match_torchvision(op, reference, factor):
    x = torch.rand(3, 3, 17, 23, generator=torch.Generator().manual_seed(op))
    ours = finish(x, **only_op(op, factor, 3))
    for b in range(3):
        torch.testing.assert_close(ours[b], reference(x[b], factor), atol=2e-6, rtol=0)


def test_jitter_order_is_per_sample():
    """Two samples with the same factors in opposite orders differ, each equal to torchvision's ops in its order."""
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)).expand(2, -1, -1, -1)
    factors = np.tile(np.array([1.3, 0.7, 1.2, 0.08], np.float32), (2, 1))
    order = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    ours = finish(x, jitter=np.ones(2, bool), jitter_factors=factors, jitter_order=order)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for b in range(2):
        expected = x[b]
        for k in order[b]:
            expected = ops[k](expected, float(factors[b, k]))
        torch.testing.assert_close(ours[b], expected, atol=3e-6, rtol=0)
    assert (ours[0] - ours[1]).abs().max() > 1e-2


@pytest.mark.parametrize(("height", "width"), [(20, 20), (13, 24), (5, 5), (3, 7)])
def test_blur_matches_torchvision(height, width):
    """Per-sample sigmas, non-square images, and kernels wider than a small image (radius clamped to
    ``min(H, W) - 1``: reflect padding needs it)."""
    sigma = np.array([2.0, 0.1, 1.3, 0.5, 1.99, 0.34], np.float32)
    x = torch.rand(len(sigma), 3, height, width, generator=torch.Generator().manual_seed(height))
    ours = finish(x, blur=np.ones(len(sigma), bool), sigma=sigma)
    for b, s in enumerate(sigma.tolist()):
        k = 2 * min(math.ceil(3 * s), min(height, width) - 1) + 1
        torch.testing.assert_close(ours[b], TF.gaussian_blur(x[b], [k, k], [s, s]), atol=2e-6, rtol=0)


def test_grayscale_solarize_normalize_match_torchvision():
    x = torch.rand(4, 3, 9, 11, generator=torch.Generator().manual_seed(5))
    flags = np.array([True, False, True, False])
    ours = finish(x, mean=IMAGENET_MEAN, std=IMAGENET_STD, grayscale=flags, solarize=np.roll(flags, 1))
    for b in range(4):
        expected = TF.rgb_to_grayscale(x[b], num_output_channels=3) if flags[b] else x[b]
        expected = TF.solarize(expected, SOLARIZE_THRESHOLD) if np.roll(flags, 1)[b] else expected
        expected = TF.normalize(expected, list(IMAGENET_MEAN), list(IMAGENET_STD))
        torch.testing.assert_close(ours[b], expected, atol=2e-6, rtol=0)


def test_module_equals_the_tensor_path():
    """DINO's views at the default sizes (2 x 128 + 2 x 64 px from 64 px images), sampled parameters: the compiled
    kernels give what the tensor operations give, to float rounding."""
    g = torch.Generator().manual_seed(6)
    images = (torch.rand(24, 3, 64, 64, generator=g) * 255).to(torch.uint8)
    compiled = BatchedMultiCrop(compiled=True)(images, 11)
    tensors = BatchedMultiCrop(compiled=False)(images, 11)
    for a, b in zip(compiled, tensors, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    other_seed = BatchedMultiCrop(compiled=True)(images, 12)
    assert (other_seed[0] - compiled[0]).abs().max() > 0.1


def test_non_contiguous_out():
    images = (torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(7)) * 255).to(torch.uint8)
    params = sample_params(5, 1, 32, 32, scale=(0.4, 1.0), blur_prob=0.5)
    expected = apply_view(images, params, 24, compiled=True)
    out = torch.empty(5, 24, 3, 24).permute(0, 2, 1, 3)
    assert apply_view(images, params, 24, out=out, compiled=True) is out
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_when_the_kernels_are_used(monkeypatch):
    assert batched_augment.uses_compiled_kernels(torch.device("cpu"))
    assert batched_augment.uses_compiled_kernels("cpu", compiled=True)
    assert not batched_augment.uses_compiled_kernels("cpu", compiled=False)
    assert not batched_augment.uses_compiled_kernels("cuda")  # other devices: tensor operations
    monkeypatch.setattr(augment_kernels, "AVAILABLE", False)
    assert not batched_augment.uses_compiled_kernels("cpu")
    with pytest.raises(RuntimeError, match="pip install numba"):
        BatchedMultiCrop(compiled=True)(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), 0)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize(
    ("source", "size", "scale"), [(64, 128, (0.4, 1.0)), (64, 64, (0.08, 0.4)), (32, 12, (0.3, 1.0))]
)
def test_height_pass_equals_the_dense_product(interpolation, source, size, scale):
    """The kernel's height pass (nonzero weights only) gives the tensor path's dense resize, enlarging and
    shrinking (antialiased: more taps), every other operation off."""
    images = (torch.rand(6, 3, source, source, generator=torch.Generator().manual_seed(size)) * 255).to(torch.uint8)
    params = sample_params(6, 2, source, source, scale=scale, blur_prob=0.0)
    mid, rows = batched_augment.resize_width(images, params["crop"], params["flip"], size, interpolation)
    host = {key: value.numpy() for key, value in params.items()}
    host.update(jitter=np.zeros(6, bool), grayscale=np.zeros(6, bool), solarize=np.zeros(6, bool))
    out = torch.full((6, 3, size, size), float("nan"))
    options = {"threshold": SOLARIZE_THRESHOLD, "mean": (0.0,) * 3, "std": (1.0,) * 3}
    augment_kernels.finish_views(
        mid.numpy(), rows.numpy(), out.numpy(), host, clip=interpolation == "bicubic", **options
    )
    expected = batched_augment.resized_crop(images, params["crop"], params["flip"], size, interpolation)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=0)


def test_shapes_are_checked():
    mid, rows = np.zeros((2, 8, 3, 10), np.float32), np.zeros((2, 12, 8), np.float32)
    options = {"clip": True, "threshold": 0.5, "mean": (0.0,) * 3, "std": (1.0,) * 3}
    params = {key: np.zeros(2, bool) for key in ("jitter", "grayscale", "blur", "solarize")}
    params.update(jitter_factors=np.ones((2, 4)), jitter_order=np.zeros((2, 4), np.int64), sigma=np.ones(2))
    augment_kernels.finish_views(mid, rows, np.zeros((2, 3, 12, 10), np.float32), params, **options)
    with pytest.raises(ValueError, match="shapes"):
        augment_kernels.finish_views(mid, rows, np.zeros((2, 3, 10, 12), np.float32), params, **options)
