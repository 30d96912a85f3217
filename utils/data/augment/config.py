"""DINO's multi-crop settings as one object, taken by both augmentation paths (per image and batched)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from utils.data.augment.params import SIGMA_RANGE

__all__ = ["MultiCropConfig"]


@dataclass(frozen=True, kw_only=True)
class MultiCropConfig:
    """Two global crops of ``global_crop_size`` px whose area is a fraction in ``global_crops_scale`` of the image,
    and ``local_crops_number`` local crops of ``local_crop_size`` px with area fraction in ``local_crops_scale``
    (official DINO's ``--global_crops_scale``, ``--local_crops_scale``, ``--local_crops_number``; crop sizes in
    pixels). Gaussian blur draws its standard deviation uniformly from ``blur_sigma`` (output pixels; official DINO's
    fixed (0.1, 2.0), chosen for 224 px crops)."""

    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_scale: tuple[float, float] = (0.08, 0.4)
    local_crops_number: int = 2
    global_crop_size: int = 128
    local_crop_size: int = 64
    blur_sigma: tuple[float, float] = SIGMA_RANGE

    def __post_init__(self) -> None:
        for name in ("global_crops_scale", "local_crops_scale"):
            scale = tuple(float(v) for v in getattr(self, name))
            if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(f"{name} must be two area fractions 0 < min <= max <= 1, got {scale}")
            object.__setattr__(self, name, scale)
        sigma = tuple(float(v) for v in self.blur_sigma)
        if len(sigma) != 2 or not 0 < sigma[0] <= sigma[1]:
            raise ValueError(f"blur_sigma must be two standard deviations 0 < min <= max (pixels), got {sigma}")
        object.__setattr__(self, "blur_sigma", sigma)
        if self.local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {self.local_crops_number}")
        if self.global_crop_size < 1 or self.local_crop_size < 1:
            raise ValueError(f"crop sizes must be positive, got {self.global_crop_size}, {self.local_crop_size}")
        object.__setattr__(self, "local_crops_number", int(self.local_crops_number))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MultiCropConfig:
        """The settings of a parsed command line (``main_dino.py``'s flags of the same names)."""
        return cls(
            global_crops_scale=tuple(args.global_crops_scale),
            local_crops_scale=tuple(args.local_crops_scale),
            local_crops_number=args.local_crops_number,
            global_crop_size=args.global_crop_size,
            local_crop_size=args.local_crop_size,
            blur_sigma=tuple(args.blur_sigma),
        )

    @classmethod
    def coerce(cls, config: MultiCropConfig | None = None, **settings) -> MultiCropConfig:
        """``config`` itself, or a config of the keyword ``settings`` (the defaults for those not given)."""
        if config is None:
            return cls(**settings)
        if not isinstance(config, MultiCropConfig):
            raise TypeError(f"pass a MultiCropConfig or keyword settings, got {type(config).__name__}")
        if settings:
            raise TypeError("pass either a MultiCropConfig or its settings, not both")
        return config

    @property
    def n_views(self) -> int:
        """Views per image: 2 global + the local ones."""
        return 2 + self.local_crops_number
