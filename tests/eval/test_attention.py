"""Attention maps: CLS maps, mass/value masks (against a brute force), figures, TensorBoard grids, the script."""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_script
from utils.eval.attention import (
    attention_grid_figure,
    attention_grid_for_tensorboard,
    attention_to_mask,
    attention_value_mask,
    backbone_cls_attention,
    cls_attention_maps,
    crop_to_patch_multiple,
    figure_to_tensor,
    heatmap_image,
    upsample_maps,
)
from utils.model.vit import build_backbone


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_backbone("vit_tiny", 16, 64)


# --------------------------------------------------------------------------------------------------------------------
# maps


def test_attention_rows_sum_to_one_and_cls_maps_follow_the_patch_grid_for_non_square_images(vit):
    images = torch.randn(2, 3, 64, 96)  # 4 x 6 patches
    with torch.no_grad():
        attn = vit.eval().get_last_selfattention(images)
    heads = vit.blocks[-1].attn.num_heads
    assert attn.shape == (2, heads, 1 + 24, 1 + 24)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, heads, 25))
    maps = cls_attention_maps(attn, (4, 6), vit.num_prefix_tokens)
    assert maps.shape == (2, heads, 4, 6)
    # row-major: patch (i, j) is token 1 + i * 6 + j of the CLS row; no renormalisation
    assert maps[1, 2, 3, 1] == attn[1, 2, 0, 1 + 3 * 6 + 1]
    torch.testing.assert_close(maps.sum((-2, -1)), 1 - attn[:, :, 0, 0])
    torch.testing.assert_close(backbone_cls_attention(vit, images), maps)
    with pytest.raises(ValueError, match="not a 4x5 grid"):
        cls_attention_maps(attn, (4, 5))


def test_backbone_cls_attention_restores_training_mode_and_refuses_partial_patches(vit):
    vit.train()
    maps = backbone_cls_attention(vit, torch.randn(1, 3, 48, 32))
    assert vit.training and maps.shape[-2:] == (3, 2)
    vit.eval()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        backbone_cls_attention(vit, torch.randn(1, 3, 50, 32))
    assert not vit.training
    assert crop_to_patch_multiple(torch.zeros(3, 50, 37), 16).shape == (3, 48, 32)


def test_upsample_nearest_repeats_patches_and_bilinear_stays_in_range():
    maps = torch.rand(2, 3, 4, 6)
    near = upsample_maps(maps, (64, 96), "nearest")
    assert near.shape == (2, 3, 64, 96)
    torch.testing.assert_close(near, maps.repeat_interleave(16, -2).repeat_interleave(16, -1))
    smooth = upsample_maps(maps, (64, 96), "bilinear")
    assert smooth.shape == (2, 3, 64, 96)
    assert smooth.min() >= maps.min() - 1e-6 and smooth.max() <= maps.max() + 1e-6
    assert not torch.equal(smooth, near)
    mask = upsample_maps(maps > 0.5, (8, 12))
    assert mask.dtype == torch.bool and mask.shape == (2, 3, 8, 12)
    with pytest.raises(ValueError):
        upsample_maps(maps, (8, 12), "bicubic")


# --------------------------------------------------------------------------------------------------------------------
# masks


def _brute_force_min_size(values: np.ndarray, threshold: float) -> int:
    """The fewest patches whose mass is >= threshold * total, over all subsets."""
    total = values.sum()
    for size in range(len(values) + 1):
        if any(values[list(s)].sum() >= threshold * total for s in itertools.combinations(range(len(values)), size)):
            return size
    raise AssertionError("unreachable")


@pytest.mark.parametrize("seed", range(4))
def test_mass_mask_is_the_smallest_set_reaching_the_threshold(seed):
    generator = torch.Generator().manual_seed(seed)
    n = 8 + seed % 3  # 8..10 patches: 256..1024 subsets
    maps = torch.rand(3, n, generator=generator, dtype=torch.float64) ** 3  # peaky, like trained attention
    maps[1] = torch.softmax(4 * maps[1], -1)
    maps[2, :2] = 0.0  # zero-attention patches
    for threshold in (0.05, 0.25, 0.5, 0.6, 0.75, 0.9, 0.99):
        mask = attention_to_mask(maps, threshold, patch_dims=1)
        assert mask.shape == maps.shape and mask.dtype == torch.bool
        for values, kept in zip(maps.numpy(), mask.numpy()):
            assert values[kept].sum() >= threshold * values.sum()
            assert kept.sum() == _brute_force_min_size(values, threshold), (threshold, values, kept)
            if kept.any() and (~kept).any():  # the kept patches are the heaviest ones
                assert values[kept].min() >= values[~kept].max()


def test_mass_mask_on_grids_matches_the_flat_rule_and_the_boundary_cases():
    maps = torch.rand(2, 3, 4, 5)
    mask = attention_to_mask(maps, 0.6)  # [..., h, w] is the default
    assert mask.shape == (2, 3, 4, 5)
    assert torch.equal(mask.flatten(-2), attention_to_mask(maps.flatten(-2), 0.6, patch_dims=1))
    assert not attention_to_mask(maps, 0.0).any()
    with_zeros = maps.clone()
    with_zeros[..., 0, 0] = 0.0
    assert attention_to_mask(with_zeros, 1.0).all()
    # exact boundary (dyadic values, no rounding): 0.5 + 0.25 reaches 0.75 of the mass with two patches, not three
    exact = torch.tensor([0.25, 0.5, 0.125, 0.125])
    assert attention_to_mask(exact, 0.75, patch_dims=1).tolist() == [True, True, False, False]
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            attention_to_mask(maps, bad)


def test_value_mask_keeps_patches_above_a_fraction_of_the_max():
    maps = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.0, 0.0, 1.0, 0.59]])
    assert attention_value_mask(maps, 0.6, patch_dims=1).tolist() == [
        [False, True, False, True],
        [False, False, True, False],
    ]
    assert attention_value_mask(maps, 0.0, patch_dims=1).all()
    assert attention_value_mask(maps, 1.0, patch_dims=1).sum(-1).tolist() == [1, 1]


# --------------------------------------------------------------------------------------------------------------------
# pictures


def test_figure_and_heatmap_render_to_uint8_rgb():
    maps = torch.rand(3, 4, 6)
    fig = attention_grid_figure(torch.rand(3, 64, 96), maps, attention_to_mask(maps, 0.6), title="t", dpi=50)
    pixels = figure_to_tensor(fig)
    width, height = fig.get_size_inches() * 50
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, round(height), round(width))
    assert pixels.float().std() > 10  # not a blank canvas
    heat = heatmap_image(maps[0], (64, 96))
    assert heat.dtype == np.uint8 and heat.shape == (64, 96, 3)


def test_attention_grid_for_tensorboard_keeps_the_training_flag(vit):
    images = torch.randn(2, 3, 64, 64)
    for training in (True, False):
        vit.train(training)
        grids = attention_grid_for_tensorboard(vit, images, threshold=0.6)
        assert vit.training is training
        assert len(grids) == 2
        for grid in grids:
            assert grid.dtype == torch.uint8 and grid.ndim == 3 and grid.shape[0] == 3 and min(grid.shape[1:]) > 100
    assert all(p.grad is None for p in vit.parameters())

    class Wrapper(torch.nn.Module):  # e.g. the teacher: backbone + head
        def __init__(self):
            super().__init__()
            self.backbone = vit

    assert len(attention_grid_for_tensorboard(Wrapper(), images[0], mask_mode="value")) == 1


# --------------------------------------------------------------------------------------------------------------------
# the script

SCRIPT_FLAGS = ["--arch", "vit_tiny", "--patch_size", "16", "--device", "cpu"]


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size  # (width, height)


def test_script_on_the_scikit_learn_photo_writes_pngs_of_the_image_size(tmp_path):
    out = tmp_path / "att"
    result = run_script(
        ["visualize_attention.py", *SCRIPT_FLAGS, "--image_size", "96", "--output_dir", str(out)], timeout=120
    )
    assert result.returncode == 0, result.stderr
    # china.jpg is 427 x 640: shorter side 96 -> 96 x 143, cropped to 96 x 128 (multiples of 16)
    names = {p.name for p in out.iterdir()}
    expected = {"china_grid.png", "china_image.png", "china_mean.png"}
    expected |= {f"china_head{i:02d}{s}.png" for i in range(3) for s in ("", "_mask")}
    assert names == expected
    for name in expected - {"china_grid.png"}:
        assert _png_size(out / name) == (128, 96), name
    width, height = _png_size(out / "china_grid.png")
    assert width > 500 and height > 300
    with Image.open(out / "china_head00_mask.png") as mask:
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
    assert str(out / "china_grid.png") in result.stdout


def test_script_on_a_folder_writes_one_grid_per_image_and_skips_broken_files(tmp_path, capsys):
    import visualize_attention  # in-process (the subprocess path is covered above): saves an interpreter start

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 255, (120, 80, 3), dtype=np.uint8)).save(images / "b.jpg")
    (images / "broken.jpg").write_bytes(b"not an image")
    (images / "notes.txt").write_text("ignored")
    out = tmp_path / "att"
    argv = [*SCRIPT_FLAGS, "--image_path", str(images), "--image_size", "64", "80", "--mask_mode", "value"]
    assert visualize_attention.cli([*argv, "--output_dir", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*_grid.png")) == ["a_grid.png", "b_grid.png"]
    assert _png_size(out / "b_head02.png") == (80, 64)
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "skipping" in err and "notes.txt" not in err


def _main_error(argv, capsys) -> str:
    """Run the script in-process (as ``python visualize_attention.py ARGV`` would); it must exit 2 with one line."""
    import visualize_attention

    with pytest.raises(SystemExit) as exc:
        visualize_attention.cli(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("threshold", ["1.5", "-0.1"])
def test_bad_threshold_is_a_one_line_error(threshold, tmp_path, capsys):
    err = _main_error(["--threshold", threshold, "--output_dir", str(tmp_path)], capsys)
    assert "--threshold must be in [0, 1]" in err
    assert not any(tmp_path.iterdir())


def test_bad_image_paths_are_one_line_errors(tmp_path, capsys):
    assert "does not exist" in _main_error(["--image_path", str(tmp_path / "nope.jpg")], capsys)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    assert "cannot read --image_path" in _main_error(["--image_path", str(broken)], capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no image files" in _main_error(["--image_path", str(empty)], capsys)


def test_stl10_images_are_seeded_and_named_by_index_and_class(tmp_path, capsys):
    stl10 = pytest.importorskip("utils.data.stl10")
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("test", 6)):
        stl10.write_stl10_binary(
            tmp_path / "stl", split, rng.integers(0, 255, (n, 96, 96, 3), dtype=np.uint8), np.arange(n) % 10
        )
    import visualize_attention

    argv = ["--dataset", "stl10", "--data_path", str(tmp_path / "stl"), "--num_images", "2", "--seed", "3"]
    args = visualize_attention.get_args_parser().parse_args(argv)
    chosen = [name for name, _, _ in visualize_attention.iter_images(args)]
    assert chosen == [name for name, _, _ in visualize_attention.iter_images(args)]  # seeded
    assert len(set(chosen)) == 2
    index = int(chosen[0][len("stl10_test") :][:4])
    assert chosen[0] == f"stl10_test{index:04d}_{stl10.STL10_CLASSES[index % 10]}"
    out = tmp_path / "att"
    argv[argv.index("2")] = "1"
    assert visualize_attention.cli([*argv, "--image_size", "64", "--output_dir", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*_grid.png")) == [f"{chosen[0]}_grid.png"]
    assert _png_size(out / f"{chosen[0]}_head00.png") == (64, 64)
    missing = _main_error(["--dataset", "stl10", "--data_path", str(tmp_path / "none")], capsys)
    assert "STL-10 not found" in missing


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
