"""A checkpoint's RNG state is restored: the random streams after a restore are those that followed the capture
(the numbers drawn then are the reference), and a run resumed mid-epoch ends with the weights of the run that was
never stopped (the student's stochastic depth draws from torch's global generator)."""

from __future__ import annotations

import random

import numpy as np
import torch

import main_dino
from tests.conftest import TINY_TRAIN_FLAGS
from utils.runtime.checkpoint import load_checkpoint, save_checkpoint
from utils.runtime.rng import capture_rng_state, restore_rng_state


def draws() -> tuple:
    return (
        [random.random() for _ in range(3)],
        np.random.rand(3).tolist(),  # noqa: NPY002
        torch.rand(3).tolist(),
        torch.randint(0, 1000, (4,)).tolist(),
    )


def test_saved_rng_state_restores_every_random_stream(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)  # noqa: NPY002
    draws()  # move away from the seeded states
    save_checkpoint({"rng": capture_rng_state()}, tmp_path / "checkpoint.pth")
    expected = draws()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)  # noqa: NPY002
    assert draws() != expected
    restore_rng_state(load_checkpoint(tmp_path / "checkpoint.pth")["rng"])
    assert draws() == expected


def test_resumed_run_equals_the_uninterrupted_run(small_synthetic, tmp_path):
    """One epoch (5 iterations) straight, against 2 iterations then a restart from the checkpoint: same weights."""
    flags = [*TINY_TRAIN_FLAGS, "--data_path", str(small_synthetic), "--knn_every", "0", "--epochs", "1"]
    flags += ["--cache_images", "off", "--drop_path_rate", "0.3"]
    assert main_dino.cli([*flags, "--output_dir", str(tmp_path / "straight")]) == 0
    resumed = ["--output_dir", str(tmp_path / "resumed")]
    assert main_dino.cli([*flags, *resumed, "--max_iters", "2"]) == 0
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pth")["global_iter"] == 2
    assert main_dino.cli([*flags, *resumed]) == 0
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint.pth")
    again = load_checkpoint(tmp_path / "resumed" / "checkpoint.pth")
    assert again["global_iter"] == straight["global_iter"] == 5
    for key in ("student", "teacher"):
        for name, value in straight[key].items():
            assert torch.equal(value, again[key][name]), f"{key} {name}"
