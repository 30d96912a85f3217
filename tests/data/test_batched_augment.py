"""Batched multi-crop augmentation (utils/data/augment/batched.py): per-sample equality with torchvision's functional
ops for fixed parameters, parameter statistics, determinism, shapes, and the benchmark script."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from tests.conftest import run_benchmark_quick
from utils.data.augment import kernels as augment_kernels
from utils.data.augment.batched import (
    BatchedMultiCrop,
    Workspace,
    apply_view,
    blur,
    blur_radius,
    color_jitter,
    gaussian_blur,
    processing_order,
    resized_crop,
    sample_crop_boxes,
    sample_params,
    shift_hue,
)
from utils.data.augment.per_image import IMAGENET_MEAN, IMAGENET_STD

MODES = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
needs_numba = pytest.mark.skipif(not augment_kernels.AVAILABLE, reason="the compiled kernels need numba")
#: Both CPU paths for everything after the resize: tensor operations, compiled kernels (utils/data/augment/kernels.py)
COMPILED = [False, pytest.param(True, marks=needs_numba)]


def smooth_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 ``[B, 3, size, size]``: smooth random colour fields plus some noise (natural-image-like statistics)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 6, 6, generator=g)
    images = torch.nn.functional.interpolate(coarse, (size, size), mode="bicubic", align_corners=False)
    images = images + 0.08 * torch.randn(batch, 3, size, size, generator=g)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def reference_view(image: torch.Tensor, params: dict, b: int, size: int, interpolation: str) -> torch.Tensor:
    """Sample ``b`` of a view computed with torchvision's functional ops on a float tensor, one op at a time."""
    x = image.float() / 255
    top, left, height, width = params["crop"][b].tolist()
    x = TF.crop(x, top, left, height, width)
    if interpolation == "bicubic":
        # PIL's bicubic resize: width pass, clip, height pass, clip (the batched pipeline does the same)
        x = TF.resize(x, [height, size], interpolation=MODES[interpolation], antialias=True).clamp(0, 1)
        x = TF.resize(x, [size, size], interpolation=MODES[interpolation], antialias=True).clamp(0, 1)
    else:
        x = TF.resize(x, [size, size], interpolation=MODES[interpolation], antialias=True)
    if params["flip"][b]:
        x = TF.horizontal_flip(x)
    if params["jitter"][b]:
        brightness, contrast, saturation, hue = params["jitter_factors"][b].tolist()
        ops = [
            lambda y: TF.adjust_brightness(y, brightness),
            lambda y: TF.adjust_contrast(y, contrast),
            lambda y: TF.adjust_saturation(y, saturation),
            lambda y: TF.adjust_hue(y, hue),
        ]
        for op in params["jitter_order"][b].tolist():
            x = ops[op](x)
    if params["grayscale"][b]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if params["blur"][b]:
        sigma = float(params["sigma"][b])
        k = min(2 * math.ceil(3 * sigma) + 1, 2 * size - 1)  # ±3 sigma, reflect padding needs radius < size
        x = TF.gaussian_blur(x, [k, k], [sigma, sigma])
    if params["solarize"][b]:
        x = TF.solarize(x, 128 / 255)
    return TF.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))


def exercise_everything(params: dict, seed: int) -> dict:
    """Fixed parameters that switch every operation on for some samples: jitter for all but the first, grayscale,
    blur and solarisation for about half, the 24 jitter orders in turn."""
    batch = params["crop"].shape[0]
    g = torch.Generator().manual_seed(seed)
    params = dict(params)
    params["jitter"] = torch.arange(batch) > 0
    orders = torch.tensor(list(__import__("itertools").permutations(range(4))))
    params["jitter_order"] = orders[torch.arange(batch) % 24]
    params["grayscale"] = torch.rand(batch, generator=g) < 0.3
    params["blur"] = torch.rand(batch, generator=g) < 0.6
    params["solarize"] = torch.rand(batch, generator=g) < 0.5
    return params


@pytest.mark.parametrize("compiled", COMPILED)
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize(
    ("source", "size", "scale"),
    [(32, 48, (0.4, 1.0)), (32, 24, (0.08, 0.4)), (32, 12, (0.3, 1.0)), (64, 128, (0.4, 1.0)), (64, 64, (0.08, 0.4))],
)
def test_each_sample_equals_torchvision_functional_ops(interpolation, source, size, scale, compiled):
    """Enlarging crops (DINO's 128 and 64 px from 64 px images; 48 and 24 px from 32 px) and shrinking ones (12 px:
    antialiased), every operation switched on for some samples; tensor operations and compiled kernels."""
    batch = 30 if size <= 64 else 12
    images = smooth_images(batch, source)
    params = sample_params(batch, 7, source, source, scale=scale, blur_prob=0.5, solarize_prob=0.2)
    params = exercise_everything(params, seed=size)
    out = apply_view(images, params, size, interpolation, compiled=compiled)
    assert out.shape == (batch, 3, size, size) and out.dtype == torch.float32
    for b in range(batch):
        expected = reference_view(images[b], params, b, size, interpolation)
        torch.testing.assert_close(out[b], expected, atol=5e-5, rtol=0, msg=f"sample {b}")


@pytest.mark.parametrize("compiled", COMPILED)
def test_module_views_equal_apply_view_on_sampled_params(compiled):
    kwargs = {"global_crop_size": 40, "local_crop_size": 20, "chunk_size": 4, "compiled": compiled}
    augment = BatchedMultiCrop(local_crops_number=1, **kwargs)
    images = smooth_images(10, 32, seed=1)
    params = augment.sample_params(10, 3, 32, 32)
    crops = augment.apply(images, params)
    for v, (p, size) in enumerate(zip(params, [40, 40, 20])):
        for b in range(10):
            expected = reference_view(images[b], p, b, size, "bicubic")
            torch.testing.assert_close(crops[v][b], expected, atol=5e-5, rtol=0)


@pytest.mark.parametrize("compiled", COMPILED)
def test_the_comparison_can_fail(compiled):
    """The reference differs from the pipeline when one parameter differs (so the equality tests have teeth)."""
    images = smooth_images(4, 32)
    params = exercise_everything(sample_params(4, 0, 32, 32, scale=(0.4, 1.0), blur_prob=0.5), seed=0)
    out = apply_view(images, params, 32, compiled=compiled)
    for key in ("flip", "grayscale"):
        changed = dict(params, **{key: ~params[key]})
        assert (out[1] - reference_view(images[1], changed, 1, 32, "bicubic")).abs().max() > 1e-2


def test_processing_order_groups_the_work():
    """Jittered samples first, grouped by the pass of their hue turn; in each group the blurred ones first, by
    kernel radius: so that every jitter pass is one hue run and at most two blend runs."""
    params = sample_params(200, 3, 32, 32, scale=(0.4, 1.0), blur_prob=0.5)
    perm = processing_order(params, 32)
    assert sorted(perm.tolist()) == list(range(200))
    p = {k: v[perm] for k, v in params.items()}
    group = torch.where(p["jitter"], (p["jitter_order"] == 3).int().argmax(dim=1), 4)
    assert torch.all(group[1:] >= group[:-1])
    for g in range(5):
        blurred, radius = p["blur"][group == g], blur_radius(p["sigma"][group == g], 31)
        assert torch.all(blurred[1:] <= blurred[:-1])  # blurred first
        assert torch.all(radius[blurred][1:] >= radius[blurred][:-1])
    for k in range(4):  # the samples whose turn is hue are one run in every pass
        hue = (p["jitter"] & (p["jitter_order"][:, k] == 3)).nonzero()[:, 0]
        assert len(hue) > 0 and hue.max() - hue.min() + 1 == len(hue)


def test_jitter_and_blur_do_not_depend_on_the_sample_order():
    """color_jitter and blur work on runs of samples, fastest when sorted, correct in any order: a shuffled batch
    gives the shuffled results (and the sorted order used by apply_view gives the same as well)."""
    params = exercise_everything(sample_params(30, 5, 32, 32, scale=(0.4, 1.0), blur_prob=0.5), seed=2)
    x = torch.rand(30, 3, 24, 24, generator=torch.Generator().manual_seed(0))

    def jitter_and_blur(images, p):
        y = color_jitter(images.clone(), p["jitter"], p["jitter_factors"], p["jitter_order"], ws=Workspace())
        return blur(y, p["blur"], p["sigma"])

    expected = jitter_and_blur(x, params)
    for perm in (torch.randperm(30, generator=torch.Generator().manual_seed(1)), processing_order(params, 24)):
        shuffled = jitter_and_blur(x[perm], {k: v[perm] for k, v in params.items()})
        torch.testing.assert_close(shuffled, expected[perm], atol=1e-6, rtol=0)
    assert not torch.allclose(expected, x, atol=1e-3)  # the operations did something


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_resize_matches_pil(interpolation):
    """Crop + resize equals PIL's (the official recipe's) up to PIL's rounding to uint8: within 1.5 / 255, 0.4 / 255
    on average (without PIL's clipping between its two passes, bicubic would be up to ~7 / 255 off at edges)."""
    images = smooth_images(16, 64, seed=2)
    resample = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
    for size, scale in [(128, (0.4, 1.0)), (64, (0.08, 0.4)), (24, (0.5, 1.0))]:
        params = sample_params(16, size, 64, 64, scale=scale, blur_prob=0.0)
        ours = resized_crop(images, params["crop"], params["flip"], size, interpolation) * 255
        for b in range(16):
            top, left, height, width = params["crop"][b].tolist()
            pil = Image.fromarray(images[b].permute(1, 2, 0).numpy()).crop((left, top, left + width, top + height))
            pil = pil.resize((size, size), resample)
            if params["flip"][b]:
                pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
            expected = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()
            diff = (ours[b] - expected).abs()
            assert diff.max() <= 1.5 and diff.mean() < 0.4, (size, b, diff.max(), diff.mean())


def hue_test_images() -> torch.Tensor:
    """float ``[5, 3, 20, 20]`` in [0, 1] with the hue's hard cases: greys, red = green and red = blue ties, many
    exact ties and extremes (0, 1), and plain noise."""
    x = torch.rand(5, 3, 20, 20, generator=torch.Generator().manual_seed(3))
    x[0] = x[0, :1]  # greys
    x[1, 1] = x[1, 0]  # red = green ties
    x[2, 2] = x[2, 0]  # red = blue ties
    x[3] = (x[3] * 4).round() / 4  # many exact ties and extremes (0, 1)
    return x


@pytest.mark.parametrize("shift", [-0.5, -0.1, -0.03, 0.0, 0.07, 0.1, 0.5])
def test_hue_matches_torchvision(shift):
    x = hue_test_images()
    ours = shift_hue(x, torch.full((5,), shift))
    for b in range(5):
        torch.testing.assert_close(ours[b], TF.adjust_hue(x[b], shift), atol=2e-6, rtol=0)


def test_hue_in_place_and_with_workspace():
    x = torch.rand(3, 3, 16, 16)
    shift = torch.tensor([0.05, -0.08, 0.1])
    expected = shift_hue(x, shift)
    y = x.clone()
    assert shift_hue(y, shift, out=y, ws=Workspace()) is y
    torch.testing.assert_close(y, expected, atol=0, rtol=0)


@pytest.mark.parametrize("max_samples", [None, 1, 3])
def test_gaussian_blur_matches_torchvision(max_samples):
    """Unsorted sigmas, runs of any length, and kernels wider than a small image (radius clamped to size - 1)."""
    x = torch.rand(7, 3, 20, 20)
    sigma = torch.tensor([2.0, 0.1, 1.3, 0.5, 1.99, 0.34, 0.67])
    out = gaussian_blur(x, sigma, max_samples=max_samples)
    small = gaussian_blur(x[:, :, :5, :5], sigma, max_samples=max_samples)
    in_place = x.clone()
    assert gaussian_blur(in_place, sigma, out=in_place, max_samples=max_samples) is in_place
    torch.testing.assert_close(in_place, out, atol=0, rtol=0)
    for b, s in enumerate(sigma.tolist()):
        k = 2 * math.ceil(3 * s) + 1
        torch.testing.assert_close(out[b], TF.gaussian_blur(x[b], [k, k], [s, s]), atol=2e-6, rtol=0)
        k = 2 * min(math.ceil(3 * s), 4) + 1
        torch.testing.assert_close(small[b], TF.gaussian_blur(x[b, :, :5, :5], [k, k], [s, s]), atol=2e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Parameter statistics


@pytest.fixture(scope="module")
def many_params():
    augment = BatchedMultiCrop(local_crops_number=2)
    return augment.sample_params(20_000, 0, 64, 64)


def test_crop_boxes_within_ranges(many_params):
    for v, params in enumerate(many_params):
        low, high = (0.4, 1.0) if v < 2 else (0.08, 0.4)
        top, left, height, width = params["crop"].T.double()
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + height <= 64).all() and (left + width <= 64).all()
        area = height * width / 64**2
        # sides are rounded to whole pixels: allow the rounding of each side
        slack = (height + width + 1) / 64**2
        assert (area >= low - slack).all() and (area <= high + slack).all()
        ratio = width / height
        assert (ratio >= 0.75 * (1 - 1 / height) - 1e-9).all() and (ratio <= 4 / 3 * (1 + 1 / height)).all()
        # the whole range is reached (the distribution within it: see test_crop_distribution_matches_torchvision;
        # retries of boxes that do not fit make large areas rarer than uniform, for torchvision as here)
        assert area.min() < low + 0.05 * (high - low) and area.max() > high - 0.05 * (high - low)


def test_crop_distribution_matches_torchvision():
    """Quantiles of crop height, width and position agree with torchvision's RandomResizedCrop.get_params."""
    n = 4000
    torch.manual_seed(0)
    image = torch.zeros(3, 64, 64)
    for scale in [(0.4, 1.0), (0.08, 0.4)]:
        theirs = torch.tensor([RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(n)])
        ours = sample_crop_boxes(n, 64, 64, scale, 1)
        for column in range(4):
            q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
            a, b = (
                torch.quantile(ours[:, column].double(), q.double()),
                torch.quantile(theirs[:, column].double(), q.double()),
            )
            assert (a - b).abs().max() <= 2.0, (scale, column, a, b)


def test_crop_fallback_like_torchvision():
    """No try fits (very wide image): the centred largest crop within the ratio range, as torchvision."""
    boxes = sample_crop_boxes(50, 20, 200, (0.9, 1.0), 0)
    torch.manual_seed(0)
    expected = RandomResizedCrop.get_params(torch.zeros(3, 20, 200), [0.9, 1.0], [3 / 4, 4 / 3])
    assert (boxes == torch.tensor(expected)).all()
    tall = sample_crop_boxes(50, 200, 20, (0.9, 1.0), 0)
    expected = RandomResizedCrop.get_params(torch.zeros(3, 200, 20), [0.9, 1.0], [3 / 4, 4 / 3])
    assert (tall == torch.tensor(expected)).all()


def assert_rate(draws: torch.Tensor, p: float, what: str) -> None:
    """The frequency of ``draws`` (bool) is ``p`` within 4 binomial standard deviations (exactly for p 0 or 1)."""
    n, rate = draws.numel(), draws.double().mean().item()
    assert abs(rate - p) <= 4 * math.sqrt(p * (1 - p) / n), f"{what}: rate {rate:.4f} for p {p} over {n} draws"


def test_probabilities_and_ranges(many_params):
    """The official recipe's probabilities (facebookresearch/dino DataAugmentationDINO): flip 0.5, colour jitter 0.8,
    grayscale 0.2 on every view; blur 1.0 / 0.1 / 0.5 (global 1, global 2, locals); solarisation 0.2 on global 2
    only."""
    n = many_params[0]["flip"].numel()
    tolerance = 4 * math.sqrt(0.25 / n)  # 4 standard deviations of a rate, at most
    blur_rates, solarize_rates = [1.0, 0.1, 0.5, 0.5], [0.0, 0.2, 0.0, 0.0]
    for v, params in enumerate(many_params):
        assert_rate(params["flip"], 0.5, f"view {v} flip")
        assert_rate(params["jitter"], 0.8, f"view {v} colour jitter")
        assert_rate(params["grayscale"], 0.2, f"view {v} grayscale")
        assert_rate(params["blur"], blur_rates[v], f"view {v} blur")
        assert_rate(params["solarize"], solarize_rates[v], f"view {v} solarisation")
        sigma = params["sigma"]
        assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(sigma.mean() - 1.05) < 0.02
        factors = params["jitter_factors"]
        for column, (low, high) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
            values = factors[:, column]
            assert values.min() >= low and values.max() <= high
            assert abs(values.mean() - (low + high) / 2) < 0.01
        order = params["jitter_order"]
        assert (order.sort(dim=1).values == torch.arange(4)).all()  # permutations
        for slot in range(4):  # every operation in every slot a quarter of the time
            counts = torch.bincount(order[:, slot], minlength=4).double() / n
            assert (counts - 0.25).abs().max() < tolerance


# ---------------------------------------------------------------------------------------------------------------
# Determinism, shapes, API


@pytest.mark.parametrize("n_local", [0, 2, 3])
def test_shapes_and_dtypes(n_local):
    augment = BatchedMultiCrop(local_crops_number=n_local, global_crop_size=32, local_crop_size=16)
    crops = augment(smooth_images(5, 24), 0)
    assert len(crops) == 2 + n_local
    assert [tuple(c.shape) for c in crops] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)] * n_local
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)
    assert crops[0].min() < 0 < crops[0].max()


def test_same_seed_same_output_and_different_seed_differs():
    augment = BatchedMultiCrop(global_crop_size=32, local_crop_size=16)
    images = smooth_images(6, 32)
    first, again, other = augment(images, 123), augment(images, 123), augment(images, 124)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(not torch.equal(a, b) for a, b in zip(first, other))
    with_generator = augment(images, torch.Generator().manual_seed(123))
    assert all(torch.equal(a, b) for a, b in zip(first, with_generator))
    # samples differ from one another (own parameters), even for identical images
    same = augment(images[:1].expand(4, -1, -1, -1).contiguous(), 5)
    assert not torch.equal(same[0][0], same[0][1])


@pytest.mark.parametrize("compiled", COMPILED)
def test_chunking_buffers_and_input_dtype_do_not_change_results(compiled):
    images = smooth_images(9, 32)
    kwargs = {"global_crop_size": 32, "local_crop_size": 16, "compiled": compiled}
    reference = BatchedMultiCrop(**kwargs, reuse_buffers=False)(images, 9)
    for variant in (BatchedMultiCrop(**kwargs, chunk_size=4), BatchedMultiCrop(**kwargs, chunk_size=100)):
        variant(images, 1)  # buffers used by another call first
        for a, b in zip(reference, variant(images, 9)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    as_float = BatchedMultiCrop(**kwargs)(images.float() / 255, 9)
    for a, b in zip(reference, as_float):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_module_behaviour():
    augment = BatchedMultiCrop(global_crop_size=32, local_crop_size=16)
    assert isinstance(augment, torch.nn.Module) and "interpolation='bicubic'" in repr(augment)
    augment(smooth_images(4, 32), 0)
    assert augment.workspace.nbytes() > 0
    assert len(pickle.dumps(augment)) < 100_000  # the workspace is not pickled
    assert augment.to("cpu") is augment
    with pytest.raises(ValueError, match="RGB"):
        augment(torch.zeros(2, 1, 32, 32, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match="interpolation"):
        BatchedMultiCrop(interpolation="nearest")
    with pytest.raises(TypeError):
        augment(smooth_images(2, 32), 1.5)
    with pytest.raises(ValueError, match="views"):
        augment.apply(smooth_images(2, 32), augment.sample_params(2, 0, 32, 32)[:3])


def test_parameters_drawn_on_the_cpu_for_an_integer_seed():
    params = BatchedMultiCrop().sample_params(3, 0)
    assert all(t.device.type == "cpu" for p in params for t in p.values())
    assert params[0]["crop"].dtype == torch.int64 and params[0]["sigma"].dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Benchmark script


def test_benchmark_quick_json(tmp_path):
    report, stdout = run_benchmark_quick("bench_augment.py", [], tmp_path / "bench.json")
    for key in ("config", "results", "speedup", "speedup_best_of", "speedup_cpu_time", "target_speedup", "target_met"):
        assert key in report
    assert set(report["results"]) == {"per_image", "per_image_collate", "batched", "batched_out", "batched_tensor_ops"}
    assert report["config"]["compiled_kernels"] == augment_kernels.AVAILABLE
    assert report["config"]["host_memory"] in ("retain", "default")
    for r in report["results"].values():
        keys = ("images_per_s", "images_per_s_min", "images_per_s_max", "images_per_s_cpu", "times_s")
        for key in (*keys, "speedup_vs_per_image"):
            assert key in r
        assert r["images_per_s_min"] <= r["images_per_s"] <= r["images_per_s_max"]
        assert len(r["times_s"]) == report["config"]["repeats"]
    assert report["config"]["torch_threads"] == 1 and report["config"]["quick"]
    assert report["speedup"] > 0 and isinstance(report["target_met"], bool)
    assert "speedup batched / per-image" in stdout
