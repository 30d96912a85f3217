"""How training samples are drawn: a resumable distributed sampler, per-sample seeding, skipping unreadable images.

The sampler yields ``(epoch, index)`` pairs rather than bare indices, so that the dataset wrapper — which may live in
a persistent worker process that never sees ``set_epoch`` — knows the epoch it draws for.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from utils.runtime.rng import sample_seed


class ResumableSampler(Sampler[tuple[int, int]]):
    """A ``DistributedSampler`` (shuffled by seed + epoch, padded to equal shares) that can start mid-epoch.

    ``set_epoch(epoch, start=k)``: the next pass skips the first ``k`` samples of this process's share (the batches
    already trained on before an interruption).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int = 0, shuffle: bool = True):
        self.base = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start
        self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(self.base)[self.start :]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self) -> int:
        return len(self.base) - self.start


class SeededSamples(Dataset):
    """Wraps a dataset of ``(image, label)`` with a random transform: item ``(epoch, index)`` is drawn with Python's
    and torch's generators seeded from (seed, epoch, rank, index), then the caller's generator states are restored.

    An unreadable or truncated image is skipped: the next index is tried instead (so the batch keeps its size), and
    the item reports whether its own file was unreadable: ``(crops, label, 0 or 1)``, so that an epoch counts each
    unreadable file once.
    """

    def __init__(self, dataset: Dataset, seed: int, rank: int, max_skips: int = 50):
        self.dataset, self.seed, self.rank, self.max_skips = dataset, seed, rank, max_skips

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        errors = []
        for skipped in range(self.max_skips + 1):
            candidate = (index + skipped) % len(self.dataset)
            try:
                image, label = self._draw(epoch, candidate)
                return image, label, int(skipped > 0)  # this index was unreadable (substitutes count when drawn)
            except (OSError, ValueError, SyntaxError) as exc:  # PIL raises these for corrupt or truncated files
                errors.append(f"{self._path(candidate)}: {exc}")
        raise RuntimeError(f"{self.max_skips + 1} unreadable images in a row, e.g. {errors[0]}")

    def _draw(self, epoch: int, index: int):
        seed = sample_seed(self.seed, epoch, self.rank, index)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)

    def _path(self, index: int) -> str:
        samples = getattr(self.dataset, "samples", None)
        return samples[index][0] if samples else f"sample {index}"
