import pytest
import torch
from PIL import Image

from utils.data.augment.per_image import IMAGENET_MEAN, DataAugmentationDINO, eval_transform


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
