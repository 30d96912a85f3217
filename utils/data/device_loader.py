"""Multi-crop batches made on the training device from the decoded-image cache (the fast data path).

Each iteration gathers a batch of uint8 images from the cache (a memory map, or a tensor already on the device) and
augments the whole batch at once with :class:`utils.data.augment.batched.BatchedMultiCrop`, seeded from
(seed, epoch, rank, step): no JPEG decoding, no per-image Python work, no worker processes, and an exactly
resumable stream (the same position gives the same crops). On a CUDA device the next batches are prepared by a
background thread on a side stream (:class:`Prefetcher`) while the training step runs.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, suppress

import torch

from utils.data.augment.batched import BatchedMultiCrop
from utils.data.augment.transfer import pinned_empty, to_device
from utils.data.image_cache import CachedImages
from utils.data.sampling import ResumableSampler
from utils.runtime.rng import sample_seed

__all__ = ["CachedMultiCropLoader", "Prefetcher"]

_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


class Prefetcher:
    """Iterator over ``produce(item)`` for ``item`` in ``items``, in order, computed by one background thread up to
    ``depth`` results ahead of the consumer.

    On a CUDA ``device`` the thread works on its own stream; each result is handed over with an event the consumer's
    current stream waits on, and its tensors are marked as used by that stream (``record_stream``), so no host
    synchronisation is needed. An exception raised by ``produce`` is raised again in the consumer, at the result it
    replaced. :meth:`close` (also called at the end, on an error and by ``with``) stops the thread and joins it;
    results made ahead and not consumed are dropped.
    """

    def __init__(self, produce: Callable, items: Iterable, depth: int = 1, device: torch.device | str = "cpu"):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        if self._cuda and self.device.index is None:  # the thread's own current device is not the caller's
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(produce, iter(items)), name="prefetch", daemon=True)
        self._thread.start()

    def _run(self, produce: Callable, items: Iterator) -> None:
        try:
            with ExitStack() as stack:
                if self._cuda:
                    stack.enter_context(torch.cuda.device(self.device))
                    stack.enter_context(torch.cuda.stream(self._stream))
                for item in items:
                    if self._stop.is_set():
                        return
                    result = produce(item)
                    event = self._stream.record_event() if self._cuda else None
                    if not self._put((result, event)):
                        return
            self._put(_END)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(_Failure(error))

    def _put(self, value) -> bool:
        """Queue ``value`` (waiting while the queue is full); false when stopped meanwhile."""
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self):
        if self._stop.is_set():
            raise StopIteration
        value = self._queue.get()
        if value is _END:
            self.close()
            raise StopIteration
        if isinstance(value, _Failure):
            self.close()
            raise value.error
        result, event = value
        if event is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(event)
            for tensor in _tensors(result):
                if tensor.device.type == "cuda":
                    tensor.record_stream(consumer)
        return result

    def close(self) -> None:
        """Stop the thread (after the result it is making) and join it."""
        self._stop.set()
        while self._thread.is_alive():
            with suppress(queue.Empty):  # unblock a waiting put
                self._queue.get(timeout=0.05)
        self._thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_thread", None) is not None and self._thread.is_alive():
            self.close()


class CachedMultiCropLoader:
    """Iterable of ``(crops, labels, n_skipped)`` like the per-image ``DataLoader`` of the training loop.

    ``crops``: ``2 + n`` float tensors ``[B, 3, S, S]`` on ``device``; ``labels`` ``[B]``; ``n_skipped`` zeros (the
    cache skipped unreadable files when it was built). Batches are the sampler's indices ``B`` at a time, the last
    incomplete batch dropped; ``images_on_device`` copies the whole cache to ``device`` first (GPU-resident data).
    ``prefetch``: batches prepared ahead by a background thread (:class:`Prefetcher`; default 1 on a CUDA device,
    0 elsewhere: each batch made when asked for). Batch ``k`` of an epoch depends only on the sampler's order, its
    start and ``k``, never on how far ahead batches were made.
    """

    def __init__(
        self,
        cache: CachedImages,
        sampler: ResumableSampler,
        batch_size: int,
        augment: BatchedMultiCrop,
        device: torch.device,
        seed: int,
        rank: int,
        images_on_device: bool = False,
        prefetch: int | None = None,
    ):
        self.cache, self.sampler, self.batch_size = cache, sampler, batch_size
        self.augment, self.device, self.seed, self.rank = augment.to(device), device, seed, rank
        self.images = cache.load_into_memory(device) if images_on_device else None
        self.labels = cache.labels.to(device) if images_on_device else None
        self.prefetch = (1 if torch.device(device).type == "cuda" else 0) if prefetch is None else prefetch

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def _batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.images is not None:
            indices = to_device(indices, self.device)
            return self.images[indices], self.labels[indices]
        buffer = pinned_empty((len(indices), *self.cache.images.shape[1:]), torch.uint8, self.device)
        images, labels = self.cache.get_batch(indices, out=buffer)
        return to_device(images, self.device), labels

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]:
        epoch, first_step = self.sampler.epoch, self.sampler.start // self.batch_size
        indices = torch.tensor([index for _, index in self.sampler], dtype=torch.long)
        no_skips = torch.zeros(1, dtype=torch.long)

        def make(b: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
            batch = indices[b * self.batch_size : (b + 1) * self.batch_size].sort().values  # sorted: memory locality
            images, labels = self._batch(batch)
            crops = self.augment(images, sample_seed(self.seed, epoch, self.rank, first_step + b))
            return crops, labels, no_skips

        if self.prefetch < 1:
            for b in range(len(self)):
                yield make(b)
            return
        with Prefetcher(make, range(len(self)), self.prefetch, self.device) as batches:
            yield from batches
