"""``--num_workers``' default under launchers: the CPUs this process may use, shared by the processes of its node.

torchrun sets ``OMP_NUM_THREADS=1`` (so torch runs one thread) and ``LOCAL_WORLD_SIZE``; the default must come from
the CPU affinity mask and the local world size, never from torch's thread count."""

import os

import pytest
import torch

import eval_knn
import eval_linear
import eval_stl10
import main_dino
from utils.runtime.distributed import cpus_per_process

CPUS = 18


@pytest.fixture
def eighteen_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(CPUS)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine has more; this process may use 18
    for name in ("LOCAL_WORLD_SIZE", "SLURM_CPUS_PER_TASK", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def under_torchrun(eighteen_cpus, monkeypatch):
    """What ``torchrun --nproc_per_node=3`` sets for each process (torch then runs one intra-op thread)."""
    env = {"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "3", "OMP_NUM_THREADS": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield CPUS // 3
    torch.set_num_threads(threads)


def test_cpus_per_process_shares_the_affinity_mask_among_local_processes(eighteen_cpus, monkeypatch):
    assert cpus_per_process() == 18
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "5")
    assert cpus_per_process() == 3  # 18 // 5
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "24")
    assert cpus_per_process() == 1  # never 0
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")  # srun: SLURM says how many CPUs this task has
    assert cpus_per_process() == 3


@pytest.mark.parametrize("script", [main_dino, eval_stl10, eval_knn, eval_linear], ids=lambda m: m.__name__)
def test_num_workers_default_under_torchrun_uses_the_cpus_not_the_thread_count(script, under_torchrun):
    assert torch.get_num_threads() == 1
    action = next(a for a in script.get_args_parser()._actions if a.dest == "num_workers")
    assert action.default == min(8, under_torchrun) == 6
