import argparse
import dataclasses

import pytest
import torch
from PIL import Image
from torchvision import transforms

from utils.data.augment import params
from utils.data.augment.batched import BatchedMultiCrop
from utils.data.augment.config import MultiCropConfig
from utils.data.augment.per_image import (
    IMAGENET_MEAN,
    DataAugmentationDINO,
    RandomGaussianBlur,
    RandomSolarize,
    eval_transform,
)


@pytest.fixture
def image():
    torch.manual_seed(0)
    return Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy())


@pytest.mark.parametrize("n_local", [0, 2, 6])
def test_multicrop_returns_two_global_and_n_local_crops(image, n_local):
    crops = DataAugmentationDINO(local_crops_number=n_local, global_crop_size=96, local_crop_size=32)(image)
    assert len(crops) == 2 + n_local
    assert [tuple(c.shape) for c in crops[:2]] == [(3, 96, 96)] * 2
    assert all(tuple(c.shape) == (3, 32, 32) for c in crops[2:])
    assert all(c.dtype == torch.float32 for c in crops)


def test_multicrop_accepts_grayscale_and_rgba(image):
    augment = DataAugmentationDINO(global_crop_size=32, local_crop_size=16)
    for mode in ("L", "RGBA", "P"):
        assert augment(image.convert(mode))[0].shape == (3, 32, 32)


def test_views_differ_and_are_normalised(image):
    crops = DataAugmentationDINO(global_crop_size=64, local_crop_size=32)(image)
    assert not torch.equal(crops[0], crops[1])
    assert crops[0].min() < 0 < crops[0].max()  # ImageNet normalisation centres values


def test_eval_transform_resize_centre_crop(image):
    out = eval_transform(48)(image.resize((100, 80)))
    assert out.shape == (3, 48, 48)
    grey = Image.new("RGB", (70, 70), tuple(int(255 * m) for m in IMAGENET_MEAN))
    assert eval_transform(32)(grey).abs().max() < 0.02  # the mean colour maps to ~0


# ---------------------------------------------------------------------------------------------------------------
# The official recipe, written out (facebookresearch/dino, main_dino.py, DataAugmentationDINO)

OFFICIAL_FLIP_AND_JITTER = [
    ("flip", {"p": 0.5}),
    (
        "color_jitter",
        {"p": 0.8, "brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2), "hue": (-0.1, 0.1)},
    ),
    ("grayscale", {"p": 0.2}),
]
OFFICIAL_BLUR_P = {"global_transform1": 1.0, "global_transform2": 0.1, "local_transform": 0.5}
OFFICIAL_SOLARIZE_P = {"global_transform1": None, "global_transform2": 0.2, "local_transform": None}


def describe(transform) -> list[tuple[str, dict]]:
    """The steps of a composed per-image transform, in order, with their probabilities and ranges."""
    steps = []
    for t in getattr(transform, "transforms", [transform]):
        if isinstance(t, transforms.Compose):
            steps += describe(t)
        elif isinstance(t, transforms.RandomResizedCrop):
            steps.append(
                (
                    "crop",
                    {
                        "size": tuple(t.size),
                        "scale": tuple(t.scale),
                        "ratio": tuple(round(r, 6) for r in t.ratio),
                        "interpolation": t.interpolation,
                    },
                )
            )
        elif isinstance(t, transforms.RandomHorizontalFlip):
            steps.append(("flip", {"p": t.p}))
        elif isinstance(t, transforms.RandomApply):
            (jitter,) = t.transforms
            assert isinstance(jitter, transforms.ColorJitter)
            ranges = {
                name: tuple(float(v) for v in getattr(jitter, name))
                for name in ("brightness", "contrast", "saturation", "hue")
            }
            steps.append(("color_jitter", {"p": t.p, **{k: tuple(round(v, 6) for v in r) for k, r in ranges.items()}}))
        elif isinstance(t, transforms.RandomGrayscale):
            steps.append(("grayscale", {"p": t.p}))
        elif isinstance(t, RandomGaussianBlur):
            steps.append(("blur", {"p": t.p, "radius": (t.radius_min, t.radius_max)}))
        elif isinstance(t, RandomSolarize):
            steps.append(("solarize", {"p": t.p}))
        elif isinstance(t, transforms.ToTensor):
            steps.append(("to_tensor", {}))
        elif isinstance(t, transforms.Normalize):
            steps.append(("normalize", {"mean": tuple(t.mean), "std": tuple(t.std)}))
        else:
            raise AssertionError(f"unexpected step {t!r}")
    return steps


def official_view(size: int, scale: tuple[float, float], name: str) -> list[tuple[str, dict]]:
    crop = {
        "size": (size, size),
        "scale": scale,
        "ratio": (0.75, 1.333333),
        "interpolation": transforms.InterpolationMode.BICUBIC,
    }
    steps = [("crop", crop), *OFFICIAL_FLIP_AND_JITTER, ("blur", {"p": OFFICIAL_BLUR_P[name], "radius": (0.1, 2.0)})]
    if OFFICIAL_SOLARIZE_P[name] is not None:
        steps.append(("solarize", {"p": OFFICIAL_SOLARIZE_P[name]}))
    return steps + [("to_tensor", {}), ("normalize", {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)})]


def test_per_image_recipe_is_the_official_one():
    """Every view's steps, order, probabilities and ranges against the official recipe: blur p 1.0 / 0.1 / 0.5,
    solarisation p 0.2 on the second global view only, flip 0.5, colour jitter p 0.8 (0.4, 0.4, 0.2, 0.1),
    grayscale 0.2, bicubic crops at the configured scales."""
    config = MultiCropConfig(
        global_crops_scale=(0.3, 1.0), local_crops_scale=(0.05, 0.3), global_crop_size=96, local_crop_size=48
    )
    augment = DataAugmentationDINO(config)
    for name, size, scale in [
        ("global_transform1", 96, (0.3, 1.0)),
        ("global_transform2", 96, (0.3, 1.0)),
        ("local_transform", 48, (0.05, 0.3)),
    ]:
        assert describe(getattr(augment, name)) == official_view(size, scale, name), name


def test_batched_views_use_the_official_per_view_probabilities():
    """The batched path's per-view draws (view_configs) and shared constants against the official numbers."""
    augment = BatchedMultiCrop(MultiCropConfig(local_crops_number=3, global_crop_size=96, local_crop_size=48))
    views = augment.view_configs()
    assert [v["blur_prob"] for v in views] == [1.0, 0.1, 0.5, 0.5, 0.5]
    assert [v["solarize_prob"] for v in views] == [0.0, 0.2, 0.0, 0.0, 0.0]
    assert [v["size"] for v in views] == [96, 96, 48, 48, 48]
    assert (params.FLIP_P, params.JITTER_P, params.GRAYSCALE_P) == (0.5, 0.8, 0.2)
    assert (params.BRIGHTNESS, params.CONTRAST, params.SATURATION, params.HUE) == (0.4, 0.4, 0.2, 0.1)
    assert params.SIGMA_RANGE == (0.1, 2.0)


def test_blur_sigma_range_reaches_both_paths_and_defaults_to_the_official_one():
    """``blur_sigma`` sets the range of the blur's standard deviation in both paths: the per-image blurs' radius
    range, and the batched draws, uniform on it (closed-form mean and bounds); the default is official (0.1, 2.0)."""
    assert MultiCropConfig().blur_sigma == (0.1, 2.0)
    config = MultiCropConfig(local_crops_number=2, global_crop_size=32, local_crop_size=16, blur_sigma=(0.3, 0.6))
    per_image = DataAugmentationDINO(config)
    for name in ("global_transform1", "global_transform2", "local_transform"):
        blurs = [t for t in getattr(per_image, name).transforms if isinstance(t, RandomGaussianBlur)]
        assert [(b.radius_min, b.radius_max) for b in blurs] == [(0.3, 0.6)], name
    draws = BatchedMultiCrop(config, compiled=False).sample_params(4000, 0, 64, 64)
    for view in draws:
        sigma = view["sigma"].double()
        assert 0.3 <= sigma.min() < 0.301 and 0.599 < sigma.max() <= 0.6
        assert abs(sigma.mean().item() - 0.45) < 0.01  # uniform: mean (a + b) / 2, standard error 0.0014
    with pytest.raises(ValueError, match="blur_sigma"):
        MultiCropConfig(blur_sigma=(0.5, 0.2))


# ---------------------------------------------------------------------------------------------------------------
# One settings object for both paths


def test_multicrop_config_from_args_and_both_paths_take_it():
    args = argparse.Namespace(
        global_crops_scale=[0.5, 1.0],
        local_crops_scale=[0.1, 0.5],
        local_crops_number=3,
        global_crop_size=40,
        local_crop_size=24,
        blur_sigma=[0.2, 0.9],
        lr=1.0,
    )
    config = MultiCropConfig.from_args(args)
    assert config == MultiCropConfig(
        global_crops_scale=(0.5, 1.0),
        local_crops_scale=(0.1, 0.5),
        local_crops_number=3,
        global_crop_size=40,
        local_crop_size=24,
        blur_sigma=(0.2, 0.9),
    )
    assert config.n_views == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.local_crops_number = 1
    with pytest.raises(TypeError):
        MultiCropConfig((0.5, 1.0))  # keywords only
    per_image = DataAugmentationDINO(config)
    batched = BatchedMultiCrop(config, compiled=False)
    assert per_image.config is config and batched.config is config
    image = Image.fromarray((torch.rand(48, 48, 3) * 255).byte().numpy())
    assert [tuple(c.shape) for c in per_image(image)] == [(3, 40, 40)] * 2 + [(3, 24, 24)] * 3
    crops = batched(torch.zeros(2, 3, 48, 48, dtype=torch.uint8), 0)
    assert [tuple(c.shape) for c in crops] == [(2, 3, 40, 40)] * 2 + [(2, 3, 24, 24)] * 3


def test_multicrop_config_accepts_the_settings_and_checks_them():
    keywords = MultiCropConfig.coerce(
        global_crops_scale=(0.5, 1.0),
        local_crops_scale=(0.1, 0.5),
        local_crops_number=3,
        global_crop_size=40,
        local_crop_size=24,
    )
    assert (keywords.global_crops_scale, keywords.local_crops_scale) == ((0.5, 1.0), (0.1, 0.5))
    assert (keywords.local_crops_number, keywords.global_crop_size, keywords.local_crop_size) == (3, 40, 24)
    assert MultiCropConfig.coerce(keywords) is keywords
    assert DataAugmentationDINO(local_crops_number=3).config == MultiCropConfig(local_crops_number=3)
    with pytest.raises(TypeError):
        BatchedMultiCrop((0.5, 1.0), (0.1, 0.5), 3, 40, 24)  # settings are keywords, or one MultiCropConfig
    with pytest.raises(TypeError, match="MultiCropConfig"):
        DataAugmentationDINO((0.5, 1.0))
    with pytest.raises(TypeError, match="not both"):
        MultiCropConfig.coerce(keywords, local_crops_number=2)
    with pytest.raises(ValueError, match="global_crops_scale"):
        MultiCropConfig(global_crops_scale=(0.6, 0.4))
    with pytest.raises(ValueError, match="local_crops_number"):
        MultiCropConfig(local_crops_number=-1)
