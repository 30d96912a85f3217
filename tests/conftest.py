"""Shared fixtures: a small embedded dataset and a helper to run the scripts as a user would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from utils.data.synthetic import generate_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]

#: Flags that make a pretraining run tiny (seconds on a 2-core CPU).
TINY_TRAIN_FLAGS = [
    "--arch",
    "vit_tiny",
    "--patch_size",
    "16",
    "--global_crop_size",
    "32",
    "--local_crop_size",
    "16",
    "--out_dim",
    "128",
    "--batch_size_per_gpu",
    "8",
    "--num_workers",
    "0",
    "--warmup_epochs",
    "1",
    "--print_freq",
    "2",
    "--lr",
    "5e-4",
]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread for in-process tests: the models here are tiny, and on a small (or shared) CPU OpenMP
    threads spinning against data workers or other processes make such forwards many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory) -> Path:
    """The embedded dataset at 4 train / 2 val images per class (40 / 20 images, 10 classes)."""
    root = tmp_path_factory.mktemp("synthetic")
    return generate_synthetic_dataset(root, train_per_class=4, val_per_class=2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_script(args: list[str], timeout: float = 300, env: dict | None = None, nproc: int = 1):
    """Run ``python <args>`` (or torchrun with ``nproc`` processes) from the repository root; returns the result."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            *args,
        ]
    else:
        cmd = [sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_benchmark_quick(script: str, flags: list[str], json_path: Path, timeout: float = 300):
    """Run ``benchmarks/<script> --quick <flags> --json <json_path>``; check it exits 0 and that its last stdout line is
    the JSON report it wrote. Returns ``(report, stdout)``."""
    command = [sys.executable, f"benchmarks/{script}", "--quick", *flags, "--json", str(json_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(Path(json_path).read_text())
    assert json.loads(result.stdout.strip().splitlines()[-1]) == report
    return report, result.stdout


@pytest.fixture(scope="session")
def tiny_checkpoint(small_synthetic, tmp_path_factory) -> Path:
    """``checkpoint.pth`` of a 1-epoch pretraining run on the small embedded dataset."""
    import main_dino

    out = tmp_path_factory.mktemp("pretrained")
    flags = [
        *TINY_TRAIN_FLAGS,
        "--data_path",
        str(small_synthetic),
        "--output_dir",
        str(out),
        "--epochs",
        "1",
        "--knn_every",
        "0",
    ]
    assert main_dino.main(flags) == 0
    return out / "checkpoint.pth"
