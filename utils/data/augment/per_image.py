"""Image transforms: DINO's multi-crop augmentation (per image, on PIL) and the evaluation transform."""

from __future__ import annotations

import random

from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

from utils.data.augment.config import MultiCropConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomGaussianBlur:
    """With probability ``p``, PIL Gaussian blur of radius uniform in [radius_min, radius_max] (pixels)."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class RandomSolarize:
    """With probability ``p``, invert every pixel value ≥ 128 (PIL's solarise)."""

    def __init__(self, p: float = 0.2):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


def normalize() -> transforms.Compose:
    """PIL image → float tensor ``[3, H, W]`` normalised with ImageNet's mean and std."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class DataAugmentationDINO:
    """DINO multi-crop: 2 global crops then ``local_crops_number`` local crops of one PIL image.

    Each crop: random resized crop (bicubic) at its scale range, horizontal flip, colour jitter (0.4, 0.4, 0.2, 0.1)
    with p 0.8, grayscale p 0.2, Gaussian blur of radius in ``blur_sigma`` (p 1.0 on global view 1, 0.1 on global
    view 2, 0.5 on local views),
    solarisation p 0.2 on global view 2, ImageNet normalisation. Returns a list of ``2 + n`` tensors
    ``[3, S, S]`` with ``S = global_crop_size`` for the first two and ``local_crop_size`` for the rest.
    Settings: a :class:`~utils.data.augment.config.MultiCropConfig`, or its fields as keywords.
    """

    def __init__(self, config: MultiCropConfig | None = None, **settings):
        self.config = cfg = MultiCropConfig.coerce(config, **settings)
        flip_and_color_jitter = transforms.Compose(
            [
                transforms.RandomHorizontalFlip(p=0.5),
                transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                transforms.RandomGrayscale(p=0.2),
            ]
        )
        bicubic = transforms.InterpolationMode.BICUBIC

        def crop(size: int, scale: tuple[float, float]) -> transforms.RandomResizedCrop:
            return transforms.RandomResizedCrop(size, scale=tuple(scale), interpolation=bicubic)

        sigma = cfg.blur_sigma
        global_crop = (cfg.global_crop_size, cfg.global_crops_scale)
        self.global_transform1 = transforms.Compose(
            [crop(*global_crop), flip_and_color_jitter, RandomGaussianBlur(1.0, *sigma), normalize()]
        )
        self.global_transform2 = transforms.Compose(
            [
                crop(*global_crop),
                flip_and_color_jitter,
                RandomGaussianBlur(0.1, *sigma),
                RandomSolarize(0.2),
                normalize(),
            ]
        )
        local_crop = (cfg.local_crop_size, cfg.local_crops_scale)
        self.local_transform = transforms.Compose(
            [crop(*local_crop), flip_and_color_jitter, RandomGaussianBlur(0.5, *sigma), normalize()]
        )
        self.local_crops_number = cfg.local_crops_number

    def __call__(self, image: Image.Image) -> list:
        image = image.convert("RGB")
        crops = [self.global_transform1(image), self.global_transform2(image)]
        crops.extend(self.local_transform(image) for _ in range(self.local_crops_number))
        return crops


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, P, RGBA, CMYK) → RGB (a top-level function, so that spawned data workers can pickle it)."""
    return image.convert("RGB")


def eval_transform(image_size: int, resize_margin: int = 8) -> transforms.Compose:
    """Evaluation transform (the original notebook's): Resize to ``image_size + resize_margin`` (bicubic, shorter
    side), CenterCrop ``image_size``, ImageNet normalisation → ``[3, image_size, image_size]``."""
    return transforms.Compose(
        [
            transforms.Lambda(to_rgb),
            transforms.Resize(image_size + resize_margin, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(image_size),
            normalize(),
        ]
    )
