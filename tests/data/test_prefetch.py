"""Batches prepared ahead by a background thread (utils/data/device_loader.py): order, errors, shutdown, and the
cached loader's batches unchanged by prefetching and by resuming mid-epoch."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from tests.data.test_host_device_copies import FakeCache, accelerator_path_augment
from utils.data import device_loader
from utils.data.device_loader import CachedMultiCropLoader, Prefetcher
from utils.data.sampling import ResumableSampler

BATCH = 8


class Counter:
    """``produce`` for a :class:`Prefetcher`: squares its item after a short random pause, counting its calls."""

    def __init__(self, fail_at: int | None = None):
        self.calls, self.fail_at = 0, fail_at
        self.rng = random.Random(0)

    def __call__(self, item: int) -> int:
        self.calls += 1
        time.sleep(self.rng.random() * 0.002)
        if item == self.fail_at:
            raise ValueError(f"bad item {item}")
        return item * item


@pytest.mark.parametrize("depth", [1, 2])
def test_prefetcher_keeps_the_order_and_ends(depth):
    with Prefetcher(Counter(), range(25), depth) as results:
        assert list(results) == [i * i for i in range(25)]
        assert not results._thread.is_alive()


def test_prefetcher_raises_the_producer_error_in_the_consumer():
    results = Prefetcher(Counter(fail_at=3), range(10), depth=2)
    assert [next(results) for _ in range(3)] == [0, 1, 4]
    with pytest.raises(ValueError, match="bad item 3"):
        next(results)
    assert not results._thread.is_alive()
    with pytest.raises(StopIteration):
        next(results)


@pytest.mark.parametrize("depth", [1, 2])
def test_prefetcher_stays_at_most_depth_ahead_and_close_joins(depth):
    produce = Counter()
    results = Prefetcher(produce, range(1000), depth)
    assert [next(results) for _ in range(3)] == [0, 1, 4]
    time.sleep(0.05)  # let the thread run ahead as far as it may
    # consumed 3, up to `depth` waiting in the queue, one made and waiting to be queued
    assert produce.calls <= 3 + depth + 1
    results.close()
    assert not results._thread.is_alive()
    assert produce.calls <= 3 + depth + 1


def test_prefetcher_rejects_a_depth_below_one():
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(Counter(), range(3), depth=0)


def make_loader(prefetch: int, images_on_device: bool = False) -> CachedMultiCropLoader:
    cache = FakeCache(n=64, size=32)
    sampler = ResumableSampler(cache, num_replicas=1, rank=0, seed=3)
    return CachedMultiCropLoader(
        cache,
        sampler,
        BATCH,
        accelerator_path_augment(batch=BATCH),
        torch.device("cpu"),
        seed=5,
        rank=0,
        images_on_device=images_on_device,
        prefetch=prefetch,
    )


def crops_of(batches) -> list[list[torch.Tensor]]:
    return [crops for crops, _, _ in batches]


def assert_same_batches(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for crops_a, crops_b in zip(a, b, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(crops_a, crops_b, strict=True))


@pytest.mark.parametrize("prefetch", [1, 2])
def test_loader_batches_do_not_depend_on_prefetching(prefetch):
    reference_loader = make_loader(prefetch=0)
    reference_loader.sampler.set_epoch(1)
    reference = crops_of(reference_loader)
    loader = make_loader(prefetch)
    loader.sampler.set_epoch(1)
    assert_same_batches(crops_of(loader), reference)
    assert len(reference) == 64 // BATCH


def test_loader_resumes_at_the_same_batch_after_a_prefetched_partial_epoch():
    """A pass stopped after 3 batches (the thread having made more) and resumed at batch 3, as the training loop
    does after a kill, gives the batches of an uninterrupted pass: prefetching consumes nothing of the sampler."""
    reference_loader = make_loader(prefetch=0)
    reference_loader.sampler.set_epoch(2)
    reference = crops_of(reference_loader)

    loader = make_loader(prefetch=2)
    loader.sampler.set_epoch(2)
    first = []
    for crops, _, _ in loader:
        first.append(crops)
        if len(first) == 3:
            break
    assert (loader.sampler.epoch, loader.sampler.start) == (2, 0)
    loader.sampler.set_epoch(2, start=3 * BATCH)
    assert_same_batches(first + crops_of(loader), reference)


def test_loader_break_stops_the_thread(monkeypatch):
    made = []
    original_init = Prefetcher.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(Prefetcher, "__init__", recording_init)
    loader = make_loader(prefetch=1)
    for index, _ in enumerate(loader):
        if index == 1:
            break
    assert len(made) == 1 and not made[0]._thread.is_alive()


def test_loader_error_reaches_the_training_thread(monkeypatch):
    loader = make_loader(prefetch=1)
    calls = []

    def failing_batch(indices):
        calls.append(len(indices))
        if len(calls) == 2:
            raise OSError("cache file vanished")
        return loader.cache.get_batch(indices)

    monkeypatch.setattr(loader, "_batch", failing_batch)
    batches = iter(loader)
    next(batches)
    with pytest.raises(OSError, match="cache file vanished"):
        next(batches)


def test_no_thread_on_the_cpu_by_default(monkeypatch):
    def no_prefetcher(*args, **kwargs):
        raise AssertionError("a prefetch thread was started on the CPU")

    monkeypatch.setattr(device_loader, "Prefetcher", no_prefetcher)
    cache = FakeCache(n=32, size=32)
    loader = CachedMultiCropLoader(
        cache, ResumableSampler(cache, 1, 0), BATCH, accelerator_path_augment(batch=BATCH), torch.device("cpu"), 0, 0
    )
    threads = threading.active_count()
    assert len(crops_of(loader)) == 32 // BATCH
    assert threading.active_count() == threads
