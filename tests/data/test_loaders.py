"""A run's data builders (utils/data/loaders.py): what the training loader's worker processes inherit."""

from __future__ import annotations

import argparse
import signal

import torch
from torch.utils.data import Dataset

from utils.data.loaders import build_train_loader
from utils.runtime.distributed import DistributedContext

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class HandlersSeen(Dataset):
    """Each item: the signal dispositions in the process that loads it (0 default, 1 ignored, 2 a Python handler)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        def code(handler) -> int:
            return 0 if handler == signal.SIG_DFL else 1 if handler == signal.SIG_IGN else 2

        return torch.tensor([code(signal.getsignal(sig)) for sig in SIGNALS]), 0


def test_training_loader_workers_ignore_stop_signals_whatever_the_parent_installed():
    """The main process alone reacts to SIGTERM/SIGUSR1/SIGUSR2 (graceful stop) and SIGINT; a worker neither runs an
    inherited Python handler nor dies of a signal meant for the job (which would break the graceful stop)."""
    args = argparse.Namespace(seed=0, batch_size_per_gpu=2, num_workers=1)
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    previous = {sig: signal.signal(sig, lambda *a: None) for sig in SIGNALS}  # e.g. submitit's or StopRequest's
    try:
        loader = build_train_loader(args, HandlersSeen(), ctx)
        seen, _, _ = next(iter(loader))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert seen.tolist() == [[1, 1, 1, 1]] * 2
