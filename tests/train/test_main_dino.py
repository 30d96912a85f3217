import math

import pytest
import torch

import main_dino
from tests.conftest import TINY_TRAIN_FLAGS, run_script
from tests.helpers import read_json_lines
from utils.runtime.checkpoint import load_checkpoint


def read_log(path):
    return read_json_lines(path / "log.txt")


def train_flags(data, out, *extra, knn_every=0):
    """The tiny model's flags on the images at ``data``, writing to ``out``, k-NN every ``knn_every`` epochs (0: never),
    then ``extra``."""
    where = ["--data_path", str(data), "--output_dir", str(out)]
    return [*TINY_TRAIN_FLAGS, *where, "--knn_every", str(knn_every), *extra]


def tensorboard_tags(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return set(acc.Tags()["scalars"]), acc


def test_short_run_writes_checkpoint_log_tensorboard_and_resumes(small_synthetic, tmp_path):
    out = tmp_path / "run"
    flags = train_flags(small_synthetic, out, knn_every=2)
    assert main_dino.cli([*flags, "--epochs", "2"]) == 0
    records = read_log(out)
    assert [r["epoch"] for r in records] == [0, 1]
    assert {"train_loss", "train_lr", "train_wd", "epoch"} <= set(records[0])
    assert "knn_top1" in records[1] and 0 <= records[1]["knn_top1"] <= 100
    assert 1 <= records[1]["knn_feature_rank"] <= 192  # ViT-Tiny's embed_dim
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["epoch"] == 2 and {"student", "teacher", "optimizer", "dino_loss", "args"} <= set(ckpt)
    assert isinstance(ckpt["args"], dict) and ckpt["knn_random_init"]["top1"] >= 0
    assert ckpt["knn_random_init"]["feature_rank"] >= 1

    tags, acc = tensorboard_tags(out)
    for tag in (
        "train/loss",
        "train/lr",
        "train/weight_decay",
        "train/teacher_momentum",
        "train/teacher_temp",
        "train/grad_norm",
        "train/images_per_s",
        "train/teacher_mean_entropy",
        "epoch/train_loss",
        "epoch/train_epoch_time_s",
        "epoch/knn_feature_rank",
    ):
        assert tag in tags, tag
    assert len(acc.Scalars("train/loss")) == 2 * 5  # 40 images / batch 8 = 5 iterations per epoch

    # Second invocation with more epochs: continues at epoch 2, does not restart from 0.
    teacher_before = ckpt["teacher"]
    assert main_dino.cli([*flags, "--epochs", "3"]) == 0
    records = read_log(out)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["epoch"] == 3 and ckpt["global_iter"] == 15
    assert not torch.equal(ckpt["teacher"]["backbone.cls_token"], teacher_before["backbone.cls_token"])


def test_max_iters_stops_early_and_rerun_continues(small_synthetic, tmp_path):
    out = tmp_path / "run"
    flags = train_flags(small_synthetic, out, "--epochs", "4")
    assert main_dino.cli([*flags, "--max_iters", "3"]) == 0
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["global_iter"] == 3 and ckpt["epoch"] == 0
    assert main_dino.cli([*flags, "--max_iters", "7"]) == 0
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["global_iter"] == 7 and ckpt["epoch"] == 1  # 5 iterations per epoch (40 images, batch 8)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--epochs", "-1"], "--epochs must be positive"),
        (["--local_crops_number", "1000"], "--local_crops_number must be in"),
        (["--arch", "vit_nonsense"], "unknown --arch"),
        (["--global_crops_scale", "0.5", "0.2"], "--global_crops_scale must satisfy"),
    ],
)
def test_user_mistakes_are_one_line_errors(small_synthetic, tmp_path, capsys, extra, message):
    flags = [*TINY_TRAIN_FLAGS, "--data_path", str(small_synthetic), "--output_dir", str(tmp_path / "o"), *extra]
    with pytest.raises(SystemExit) as exc:
        main_dino.cli(flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_missing_data_names_download_and_synthetic(tmp_path):
    result = run_script(["main_dino.py", "--data_path", str(tmp_path / "nothing"), "--output_dir", str(tmp_path)])
    assert result.returncode == 2
    assert "--download" in result.stderr and "--dataset synthetic" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_gloo_run_completes(small_synthetic, tmp_path):
    out = tmp_path / "ddp"
    result = run_script(
        [
            "main_dino.py",
            *train_flags(small_synthetic, out, "--batch_size_per_gpu", "4", "--epochs", "2", knn_every=2),
            *["--koleo_loss_weight", "0.1"],  # the KoLeo path through DDP (features returned by the wrapped student)
        ],
        nproc=2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_log(out)
    assert [r["epoch"] for r in records] == [0, 1] and "knn_top1" in records[-1]
    assert math.isfinite(records[-1]["train_koleo"]) and records[-1]["train_koleo"] != 0
    assert load_checkpoint(out / "checkpoint.pth")["global_iter"] == 10  # 40 images / (4 x 2) per iteration


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_run_that_builds_the_image_cache_with_a_decode_pool_completes(small_synthetic, tmp_path):
    """Rank 0 builds the cache with a 2-process decode pool (forced on for this small dataset) while rank 1 waits at
    the barrier; the run must finish, the pool's workers joined (issue 17: a hang until the time limit)."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    flags = train_flags(small_synthetic, out, "--cache_dir", str(cache), "--cache_images", "on", "--epochs", "1")
    flags += ["--batch_size_per_gpu", "4"]
    result = run_script(["main_dino.py", *flags], nproc=2, env={"TINYDINO_CACHE_WORKERS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(2 process(es))" in result.stderr, result.stderr[-3000:]  # the pool did decode the images
    assert [r["epoch"] for r in read_log(out)] == [0]


def test_attn_every_writes_attention_images_to_tensorboard(small_synthetic, tmp_path):
    out = tmp_path / "attn"
    assert main_dino.cli(train_flags(small_synthetic, out, "--epochs", "2", "--attn_every", "1")) == 0
    _, acc = tensorboard_tags(out)
    image_tags = acc.Tags()["images"]
    assert sorted(image_tags) == [f"attention/image{i}" for i in range(4)]
    events = acc.Images("attention/image0")
    assert [e.step for e in events] == [0, 1]
    assert events[0].width > 100 and events[0].height > 100


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--cache_images", "on"], "decoded-image cache + batched augmentation"),
        (["--cache_images", "on", "--batched_aug", "off"], "per-image augmentation in data workers from the cache"),
        (["--cache_images", "off"], "(per-image augmentation in data workers)"),
    ],
)
def test_data_pipelines(small_synthetic, tmp_path, capsys, flags, expected):
    out = tmp_path / "run"
    assert main_dino.cli(train_flags(small_synthetic, out, "--epochs", "1", *flags)) == 0
    assert expected in capsys.readouterr().out
    assert len(read_log(out)) == 1


@pytest.mark.slow
def test_compile_flag_trains(small_synthetic, tmp_path):
    out = tmp_path / "compiled"
    assert main_dino.cli(train_flags(small_synthetic, out, "--epochs", "1", "--max_iters", "2", "--compile")) == 0
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["global_iter"] == 2
    assert not any(k.startswith("_orig_mod") for k in ckpt["student"])  # plain keys, loadable without compile
