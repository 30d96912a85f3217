"""Every row of the README's user-mistakes table: a one-line error, exit code 2, nothing in output_dir overwritten."""

import pytest
import torch

import eval_knn
import main_dino
import visualize_attention
from tests.conftest import TINY_TRAIN_FLAGS


def one_line_error(capsys, call) -> str:
    with pytest.raises(SystemExit) as exc:
        call()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def output_dir(tmp_path):
    """An output folder holding a previous run's files, which a failing command must leave untouched."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.txt").write_text('{"epoch": 0}\n')
    torch.save({"epoch": 1}, out / "checkpoint.pth")
    return out


def unchanged(output_dir):
    return (output_dir / "log.txt").read_text() == '{"epoch": 0}\n' and sorted(
        p.name for p in output_dir.iterdir()
    ) == ["checkpoint.pth", "log.txt"]


def train(small_synthetic, output_dir, *extra):
    return lambda: main_dino.cli(
        [*TINY_TRAIN_FLAGS, "--data_path", str(small_synthetic), "--output_dir", str(output_dir), *extra]
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--epochs", "-1"], "--epochs must be positive (got -1)"),
        (["--local_crops_number", "1000"], "--local_crops_number must be in [0, 64] (got 1000)"),
        (["--global_crops_scale", "0.5", "0.2"], "--global_crops_scale must satisfy 0 < min <= max <= 1"),
        (["--blur_sigma", "0", "2"], "--blur_sigma must satisfy 0 < min <= max (got 0.0 2.0)"),
        (["--arch", "vit_huge_nonsense"], "unknown --arch 'vit_huge_nonsense'"),
        (["--batch_size_per_gpu", "256"], "fewer than one batch of 256 per process x 1 processes"),
    ],
)
def test_pretraining_flag_mistakes(small_synthetic, output_dir, capsys, extra, message):
    assert message in one_line_error(capsys, train(small_synthetic, output_dir, *extra))
    assert unchanged(output_dir)


def test_missing_data_path(tmp_path, output_dir, capsys):
    err = one_line_error(capsys, train(tmp_path / "nowhere", output_dir))
    assert "no dataset at" in err and "--download" in err and "--dataset synthetic" in err
    assert unchanged(output_dir)


def test_folder_with_no_images(tmp_path, output_dir, capsys):
    empty = tmp_path / "empty"
    (empty / "train" / "cats").mkdir(parents=True)
    (empty / "train" / "cats" / "notes.txt").write_text("not an image")
    err = one_line_error(capsys, train(empty, output_dir))
    assert "no images" in err or "Found no valid file" in err
    assert unchanged(output_dir)


def test_checkpoint_key_not_in_the_file_lists_keys(small_synthetic, tmp_path, output_dir, capsys):
    weights = tmp_path / "ckpt.pth"
    torch.save({"teacher": {}, "student": {}, "optimizer": {}, "epoch": 3}, weights)
    err = one_line_error(
        capsys,
        lambda: eval_knn.cli(
            [
                "--pretrained_weights",
                str(weights),
                "--checkpoint_key",
                "nope",
                "--data_path",
                str(small_synthetic),
                "--image_size",
                "32",
                "--output_dir",
                str(output_dir),
            ]
        ),
    )
    assert "no 'nope' entry" in err and "optimizer, student, teacher" in err
    assert unchanged(output_dir)


def test_weights_of_another_architecture(small_synthetic, tmp_path, output_dir, capsys):
    from utils.model.vit import build_backbone

    weights = tmp_path / "small.pth"
    torch.save(build_backbone("vit_small", 16, 32).state_dict(), weights)
    err = one_line_error(
        capsys,
        lambda: eval_knn.cli(
            [
                "--pretrained_weights",
                str(weights),
                "--arch",
                "vit_tiny",
                "--data_path",
                str(small_synthetic),
                "--image_size",
                "32",
                "--output_dir",
                str(output_dir),
            ]
        ),
    )
    assert "do not fit this architecture" in err and "shape mismatches" in err and "--arch" in err
    assert unchanged(output_dir)


class CustomObject:
    """Any class outside the weights-only allow-list makes a checkpoint need full unpickling."""

    def __init__(self):
        self.value = 1


def test_checkpoint_that_needs_pickle(small_synthetic, tmp_path, output_dir, capsys):
    weights = tmp_path / "pickled.pth"
    torch.save({"teacher": {}, "extra": CustomObject()}, weights)
    err = one_line_error(
        capsys,
        lambda: eval_knn.cli(
            [
                "--pretrained_weights",
                str(weights),
                "--data_path",
                str(small_synthetic),
                "--image_size",
                "32",
                "--output_dir",
                str(output_dir),
            ]
        ),
    )
    assert "refusing it" in err and "--trust_checkpoint" in err
    assert unchanged(output_dir)


def test_attention_threshold_outside_unit_interval(output_dir, capsys):
    err = one_line_error(
        capsys, lambda: visualize_attention.cli(["--threshold", "1.5", "--output_dir", str(output_dir)])
    )
    assert "--threshold" in err and "1.5" in err
    assert unchanged(output_dir)
