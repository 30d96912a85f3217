"""Never lose work: exact resume after SIGKILL, kills during saves, SIGTERM, non-finite losses, bad data."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, TINY_TRAIN_FLAGS
from utils.runtime.checkpoint import load_checkpoint, load_latest_checkpoint, save_checkpoint

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
@pytest.mark.parametrize(
    "pipeline",
    [
        ["--cache_images", "off", "--num_workers", "0"],
        ["--cache_images", "off", "--num_workers", "2"],
        ["--cache_images", "on", "--batched_aug", "on"],
    ],
    ids=["per-image-0-workers", "per-image-2-workers", "cache-batched"],
)
def test_sigkill_at_random_iterations_then_resume_is_bitwise_identical(small_synthetic, tmp_path, pipeline):
    flags = [*RESUME_FLAGS, "--data_path", str(small_synthetic), *pipeline]
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
        "from utils.runtime import checkpoint\n"
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


def tiny_state(clip_grad=3.0):
    import argparse

    from utils.model.vit import build_dino_models
    from utils.train.loss import DINOLoss
    from utils.train.optim import build_optimizer, get_params_groups
    from utils.train.step import DINOState

    torch.manual_seed(0)
    args = argparse.Namespace(
        arch="vit_tiny",
        patch_size=16,
        global_crop_size=32,
        drop_path_rate=0.0,
        out_dim=32,
        use_bn_in_head=False,
        norm_last_layer=True,
    )
    student, teacher = build_dino_models(args)
    optimizer = build_optimizer("adamw", get_params_groups(student))
    loss = DINOLoss(32, 4, 0.04, 0.04, 0, 10)
    return DINOState(
        student=student,
        teacher=teacher,
        student_module=student,
        loss=loss,
        optimizer=optimizer,
        scaler=None,
        device=torch.device("cpu"),
        clip_grad=clip_grad,
        freeze_last_layer=0,
    )


def crops(batch=4, poison=False):
    views = [torch.randn(batch, 3, 32, 32) for _ in range(2)] + [torch.randn(batch, 3, 16, 16) for _ in range(2)]
    if poison:
        views[0][0, 0, 0, 0] = float("nan")
    return views


def test_non_finite_loss_skips_the_step_without_touching_the_weights():
    from utils.train.step import StepSchedule, train_step

    state = tiny_state()
    schedule = StepSchedule(lr=1e-3, weight_decay=0.04, momentum=0.9)
    train_step(state, crops(), 0, schedule)
    before = {k: v.clone() for k, v in state.student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in state.teacher.state_dict().items()}
    optimizer_steps = [s["step"].clone() for s in state.optimizer.state.values()]
    stats = train_step(state, crops(poison=True), 0, schedule)._asdict()
    assert stats["skipped"] == 1.0
    for k, v in state.student.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in state.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert [s["step"] for s in state.optimizer.state.values()] == optimizer_steps  # Adam's step count too
    assert torch.isfinite(state.loss.center).all()
    stats = train_step(state, crops(), 0, schedule)._asdict()
    assert stats["skipped"] == 0.0
    assert not torch.equal(state.student.state_dict()["backbone.cls_token"], before["backbone.cls_token"])
    assert all(torch.isfinite(v).all() for v in state.student.state_dict().values())


def test_non_finite_steps_are_counted_and_the_streak_resets():
    import numpy as np

    from utils.runtime.monitoring import TensorBoard
    from utils.train.step import EpochPlan, train_one_epoch

    state = tiny_state()
    poison = [False, True, True, False, True, False]
    loader = [(crops(poison=p), torch.zeros(4), torch.zeros(4, dtype=torch.long)) for p in poison]
    schedules = {"lr": np.full(10, 1e-3), "wd": np.full(10, 0.04), "momentum": np.full(10, 0.99)}
    result = train_one_epoch(
        state, loader, EpochPlan(epoch=0, global_iter=0, max_nonfinite=3, print_freq=4), schedules, TensorBoard(None)
    )
    assert state.nonfinite_steps == 3 and state.consecutive_nonfinite == 0
    assert result.averages["nonfinite_steps"] == 3.0 and result.finished


def test_run_stops_after_max_nonfinite_consecutive_losses():
    import numpy as np

    from utils.runtime.monitoring import TensorBoard
    from utils.train.step import NONFINITE_ADVICE, EpochPlan, NonFiniteLossError, train_one_epoch

    state = tiny_state()
    loader = [(crops(poison=True), torch.zeros(4), torch.zeros(4, dtype=torch.long)) for _ in range(6)]
    schedules = {"lr": np.full(10, 1e-3), "wd": np.full(10, 0.04), "momentum": np.full(10, 0.99)}
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses") as exc:
        train_one_epoch(state, loader, EpochPlan(epoch=0, global_iter=0, max_nonfinite=3), schedules, TensorBoard(None))
    assert "--precision" in str(exc.value) and "--lr" in NONFINITE_ADVICE and "--clip_grad" in NONFINITE_ADVICE
    assert all(torch.isfinite(v).all() for v in state.student.state_dict().values())


@pytest.mark.slow
def test_corrupt_and_truncated_images_are_skipped_and_reported(small_synthetic, tmp_path):
    import json
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_synthetic, data, ignore=shutil.ignore_patterns(".tinydino_cache"))
    first_class = sorted((data / "train").iterdir())[0]
    good = sorted(first_class.glob("*.JPEG"))[0].read_bytes()
    (first_class / "0_corrupt.JPEG").write_bytes(b"this is not a jpeg")  # sorts first: also the size probe's pick
    (first_class / "0_truncated.JPEG").write_bytes(good[: len(good) // 3])
    flags = [
        *TINY_TRAIN_FLAGS,
        "--data_path",
        str(data),
        "--epochs",
        "1",
        "--knn_every",
        "0",
        "--batch_size_per_gpu",
        "6",
    ]
    out = run_to_end([*flags, "--output_dir", str(tmp_path / "run"), "--cache_images", "off"])
    assert "skipped 2 unreadable image(s)" in out
    record = json.loads((tmp_path / "run" / "log.txt").read_text().splitlines()[-1])
    assert record["train_bad_images"] == 2
    # Each mode builds its own cache (its own --cache_dir, so nothing depends on which test ran first); the cache
    # skips the two images when it is built and says so, and again when a later run reuses it unchanged.
    for mode in ("on", "auto"):
        cache = ["--cache_dir", str(tmp_path / f"cache_{mode}"), "--cache_images", mode]
        assert not (tmp_path / f"cache_{mode}").exists()
        assert "2 unreadable image(s) skipped" in run_to_end([*flags, "--output_dir", str(tmp_path / mode), *cache])
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache_on").rglob("*") if p.is_file()}
    assert files
    again = ["--output_dir", str(tmp_path / "again"), "--cache_dir", str(tmp_path / "cache_on"), "--cache_images", "on"]
    assert "2 unreadable image(s) skipped" in run_to_end([*flags, *again])
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache_on").rglob("*") if p.is_file()} == files  # reused


def test_pickle_payload_checkpoint_in_output_dir_is_refused(small_synthetic, tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    run = tmp_path / "run"
    run.mkdir()
    torch.save({"student": Payload()}, run / "checkpoint.pth")
    proc = subprocess.run(
        [
            sys.executable,
            "main_dino.py",
            *TINY_TRAIN_FLAGS,
            "--data_path",
            str(small_synthetic),
            "--output_dir",
            str(run),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "--trust_checkpoint" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_when_one_rank_dies_the_other_exits_within_the_timeout(small_synthetic, tmp_path):
    from tests.conftest import free_port

    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        args = [
            *TINY_TRAIN_FLAGS,
            "--data_path",
            str(small_synthetic),
            "--output_dir",
            str(tmp_path / "run"),
            "--epochs",
            "50",
            "--knn_every",
            "0",
            "--batch_size_per_gpu",
            "4",
            "--dist_timeout",
            "30",
        ]
        procs.append(
            subprocess.Popen(
                [sys.executable, "main_dino.py", *args],
                cwd=ROOT,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    seen = []
    for line in procs[0].stdout:  # wait until rank 0 trains (the loop also ends if rank 0 exits first)
        seen.append(line)
        if line.startswith("Epoch ["):
            break
    assert seen and seen[-1].startswith("Epoch [") and procs[0].poll() is None, "".join(seen)[-3000:]
    procs[1].kill()
    killed_at = time.time()
    procs[0].communicate(timeout=120)
    assert procs[0].returncode != 0
    assert time.time() - killed_at < 30 + 15


def test_collapse_warning_after_a_sustained_constant_or_uniform_teacher():
    import math

    from utils.train.step import CollapseMonitor

    healthy = {"teacher_mean_entropy": 5.0, "teacher_sample_entropy": 2.0}
    constant = {"teacher_mean_entropy": 0.01, "teacher_sample_entropy": 0.01}
    uniform = {"teacher_mean_entropy": math.log(1000), "teacher_sample_entropy": math.log(1000) - 0.01}
    monitor = CollapseMonitor(out_dim=1000, patience=5)
    assert [monitor.update(constant) for _ in range(4)] == [None] * 4
    assert monitor.update(healthy) is None  # the streak is broken
    assert [monitor.update(constant) for _ in range(4)] == [None] * 4
    message = monitor.update(constant)
    assert "constant" in message and "--lr" in message and "--momentum_teacher" in message
    assert monitor.update(constant) is None  # warned once
    monitor = CollapseMonitor(out_dim=1000, patience=3)
    messages = [monitor.update(uniform) for _ in range(3)]
    assert messages[:2] == [None, None] and "uniform" in messages[2] and "--teacher_temp" in messages[2]
    assert all(CollapseMonitor(1000, 1).update(healthy) is None for _ in range(3))
