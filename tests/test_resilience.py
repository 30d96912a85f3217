"""Never lose work: exact resume after SIGKILL, kills during saves, SIGTERM, non-finite losses, bad data."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, TINY_TRAIN_FLAGS
from utils.checkpoint import load_checkpoint, load_latest_checkpoint, save_checkpoint

RESUME_FLAGS = [
    *TINY_TRAIN_FLAGS,
    "--epochs",
    "2",
    "--checkpoint_every",
    "1",
    "--deterministic",
    "--knn_every",
    "0",
    "--print_freq",
    "1",
    "--drop_path_rate",
    "0.1",
]


def start(args, env=None):
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "main_dino.py", *args],
        cwd=ROOT,
        env=full_env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def run_to_end(args, env=None, timeout=300):
    proc = start(args, env)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def kill_after(args, progress_lines: int, sig=signal.SIGKILL, timeout=300):
    """Start a run and send ``sig`` once it has printed ``progress_lines`` progress lines."""
    proc = start(args)
    seen, deadline, output = 0, time.time() + timeout, []
    for line in proc.stdout:
        output.append(line)
        if line.startswith("Epoch ["):
            seen += 1
            if seen >= progress_lines:
                proc.send_signal(sig)
                break
        assert time.time() < deadline
    rest, _ = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(output) + (rest or "")


def final_params(output_dir):
    ckpt = load_checkpoint(output_dir / "checkpoint.pth")
    return ckpt


def assert_bitwise_equal(a, b):
    for model in ("student", "teacher"):
        for key in a[model]:
            assert torch.equal(a[model][key], b[model][key]), f"{model}.{key} differs"
    assert torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"])
    assert a["global_iter"] == b["global_iter"]


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", ["0", "2"])
def test_sigkill_at_random_iterations_then_resume_is_bitwise_identical(small_synthetic, tmp_path, num_workers):
    flags = [*RESUME_FLAGS, "--data_path", str(small_synthetic), "--num_workers", num_workers]
    reference = tmp_path / "reference"
    run_to_end([*flags, "--output_dir", str(reference)])
    interrupted = tmp_path / "interrupted"
    for kill_at in (3, 4):  # progress lines seen before SIGKILL (5 iterations per epoch, 10 in all)
        code, _ = kill_after([*flags, "--output_dir", str(interrupted)], kill_at)
        assert code == -signal.SIGKILL
    out = run_to_end([*flags, "--output_dir", str(interrupted)])
    assert "resumed from" in out
    assert_bitwise_equal(final_params(reference), final_params(interrupted))


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    """A process killed while writing leaves the old checkpoint intact (the write goes to a temp file)."""
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    script = (
        "import sys, os, torch\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from utils import checkpoint\n"
        "real_save = torch.save\n"
        "def dying_save(obj, fh):\n"
        "    real_save(obj, fh); fh.flush(); fh.truncate(100); os.kill(os.getpid(), 9)\n"
        "checkpoint.torch.save = dying_save\n"
        "checkpoint.save_checkpoint({'epoch': 2, 'w': torch.zeros(1000)}, sys.argv[1])\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(path), str(ROOT)], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert load_checkpoint(path)["epoch"] == 1


def test_corrupt_checkpoint_is_reported_and_the_newest_good_one_used(tmp_path):
    save_checkpoint({"epoch": 20}, tmp_path / "checkpoint0019.pth")
    save_checkpoint({"epoch": 40}, tmp_path / "checkpoint0039.pth")
    (tmp_path / "checkpoint.pth").write_bytes(b"PK\x03\x04 truncated")
    messages = []
    path, ckpt = load_latest_checkpoint(tmp_path, warn=messages.append)
    assert path.name == "checkpoint0039.pth" and ckpt["epoch"] == 40
    assert len(messages) == 1 and "truncated or corrupt" in messages[0]


@pytest.mark.slow
def test_sigterm_checkpoints_current_iteration_and_exits_zero(small_synthetic, tmp_path):
    out_dir = tmp_path / "run"
    flags = [
        *RESUME_FLAGS,
        "--data_path",
        str(small_synthetic),
        "--output_dir",
        str(out_dir),
        "--checkpoint_every",
        "0",
    ]
    code, out = kill_after(flags, 2, sig=signal.SIGTERM)
    assert code == 0, out[-2000:]
    assert "stop requested (SIGTERM)" in out
    ckpt = load_checkpoint(out_dir / "checkpoint.pth")
    assert 2 <= ckpt["global_iter"] < 10 and ckpt["iter_in_epoch"] == ckpt["global_iter"] % 5
    out = run_to_end(flags)
    assert "resumed from" in out
    assert load_checkpoint(out_dir / "checkpoint.pth")["global_iter"] == 10
