"""Shared fixtures (a small embedded dataset, a helper to run the scripts as a user would) and the session's rules:

- no network: every Python process of the session (this one, and the ones it starts, through
  ``tests/netguard/sitecustomize.py`` on ``PYTHONPATH``) refuses socket connections outside the loopback; a test during
  which any process tried one fails, naming the address;
- no writes outside temporary folders: the caches of Hugging Face, torch, Numba and XDG point into a session folder.

The environment is set when this module is imported, before any library that reads it at import time.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NETGUARD_DIR = ROOT / "tests" / "netguard"
#: The session's scratch folder for caches that libraries write (removed at the end of the session). Created once:
#: this module is imported twice (as ``conftest`` by pytest, as ``tests.conftest`` by tests), and the processes the
#: tests start inherit it.
SESSION_ENV = "TINYDINO_TEST_SESSION_DIR"
#: Whether this process made the folder (a pytest run inside a test reuses its parent's and leaves it in place).
OWNS_SESSION_DIR = not os.environ.get(SESSION_ENV)
if OWNS_SESSION_DIR:
    os.environ[SESSION_ENV] = tempfile.mkdtemp(prefix="tinydino-tests-")
SESSION_DIR = Path(os.environ[SESSION_ENV])
NETWORK_LOG = SESSION_DIR / "network-attempts.log"

os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_HOME=str(SESSION_DIR / "huggingface"),
    TORCH_HOME=str(SESSION_DIR / "torch"),
    XDG_CACHE_HOME=str(SESSION_DIR / "cache"),
    NUMBA_CACHE_DIR=str(SESSION_DIR / "numba"),
    MPLCONFIGDIR=str(SESSION_DIR / "matplotlib"),
    TINYDINO_NETWORK_LOG=str(NETWORK_LOG),
    PYTHONPATH=os.pathsep.join(
        dict.fromkeys([str(NETGUARD_DIR), *filter(None, os.getenv("PYTHONPATH", "").split(os.pathsep))])
    ),
)
sys.path.insert(0, str(NETGUARD_DIR))
import netguard  # noqa: E402

sys.path.remove(str(NETGUARD_DIR))
netguard.install()

import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

from utils.data.synthetic import generate_synthetic_dataset  # noqa: E402


def network_attempts() -> list[str]:
    """Every refused connection of the session so far, of this process and of those it started (one log for all)."""
    return NETWORK_LOG.read_text().splitlines() if NETWORK_LOG.exists() else []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _session_rules(item, "setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _session_rules(item, "call"))


#: Entries that may appear in the repository root during a run (Python's and the tools' own caches).
ROOT_CACHES = {"__pycache__", ".pytest_cache", ".ruff_cache"}


#: The working directory pytest started in (in-process script runs write there at ``--output_dir .``).
LAUNCH_DIR = Path.cwd()


def _written_in_root() -> set[str]:
    """Top-level entries of the repository root and of the launch directory: where a script run without
    ``--output_dir`` (default ``.``) writes."""
    return {str(folder / name) for folder in {ROOT, LAUNCH_DIR} for name in os.listdir(folder)}


def _session_rules(item, phase):
    """Generator body of the two wrappers above: fail the test if any process tried the network during ``phase``
    (even when the code under test caught the guard's error), or if a new file appeared in the repository root or
    the launch directory (a script left at ``--output_dir .``)."""
    before, files_before = len(network_attempts()), _written_in_root()
    result = yield
    new = network_attempts()[before:]
    if new:
        raise netguard.NetworkAccessError(f"{item.nodeid} ({phase}) tried the network: {'; '.join(new[:5])}")
    written = sorted(p for p in _written_in_root() - files_before if Path(p).name not in ROOT_CACHES)
    if written:
        raise AssertionError(f"{item.nodeid} ({phase}) wrote outside its temporary folders: {', '.join(written)}")
    return result


#: Per-test time limit of the tests marked ``slow`` (the others get pyproject.toml's ``timeout``).
SLOW_TEST_TIMEOUT_S = 900


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT_S))


def pytest_sessionfinish(session, exitstatus):
    if OWNS_SESSION_DIR:
        shutil.rmtree(SESSION_DIR, ignore_errors=True)


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
def own_cache_home(tmp_path_factory, monkeypatch):
    """Each test its own ``XDG_CACHE_HOME`` (where the scripts keep the decoded-image cache unless ``--cache_dir``
    says otherwise): whether a test builds a cache or reuses one never depends on the tests that ran before it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))


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
    assert main_dino.cli(flags) == 0
    return out / "checkpoint.pth"
