"""Multi-crop batches made on the training device from the decoded-image cache (the fast data path).

Each iteration gathers a batch of uint8 images from the cache (a memory map, or a tensor already on the device) and
augments the whole batch at once with :class:`utils.data.augment.batched.BatchedMultiCrop`, seeded from
(seed, epoch, rank, step): no JPEG decoding, no per-image Python work, no worker processes, and an exactly
resumable stream (the same position gives the same crops).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from utils.data.augment.batched import BatchedMultiCrop
from utils.data.image_cache import CachedImages
from utils.runtime.rng import sample_seed
from utils.data.sampling import ResumableSampler


class CachedMultiCropLoader:
    """Iterable of ``(crops, labels, n_skipped)`` like the per-image ``DataLoader`` of the training loop.

    ``crops``: ``2 + n`` float tensors ``[B, 3, S, S]`` on ``device``; ``labels`` ``[B]``; ``n_skipped`` zeros (the
    cache skipped unreadable files when it was built). Batches are the sampler's indices ``B`` at a time, the last
    incomplete batch dropped; ``images_on_device`` copies the whole cache to ``device`` first (GPU-resident data).
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
    ):
        self.cache, self.sampler, self.batch_size = cache, sampler, batch_size
        self.augment, self.device, self.seed, self.rank = augment.to(device), device, seed, rank
        self.images = cache.load_into_memory(device) if images_on_device else None
        self.labels = cache.labels.to(device) if images_on_device else None

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def _batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.images is not None:
            indices = indices.to(self.device)
            return self.images[indices], self.labels[indices]
        images, labels = self.cache.get_batch(indices)
        pin = self.device.type == "cuda"
        images = images.pin_memory() if pin else images
        return images.to(self.device, non_blocking=pin), labels

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]:
        epoch, first_step = self.sampler.epoch, self.sampler.start // self.batch_size
        indices = torch.tensor([index for _, index in self.sampler], dtype=torch.long)
        no_skips = torch.zeros(1, dtype=torch.long)
        for b in range(len(self)):
            batch = indices[b * self.batch_size : (b + 1) * self.batch_size].sort().values  # sorted: memory locality
            images, labels = self._batch(batch)
            crops = self.augment(images, sample_seed(self.seed, epoch, self.rank, first_step + b))
            yield crops, labels, no_skips
