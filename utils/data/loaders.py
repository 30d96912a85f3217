"""The data of a pretraining run, built from its flags: the training loader, the online k-NN splits, the attention
images, and the decoded-image cache they read from.

Two training pipelines: per-image augmentation in ``DataLoader`` workers (:func:`build_train_loader`), or uint8
batches from the image cache augmented as whole batches on the training device (:func:`build_cached_loader`).
Both yield resumable, per-sample seeded batches; too small a dataset for one batch per process is a ``UsageError``.
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from utils.data.augment.batched import BatchedMultiCrop
from utils.data.augment.config import MultiCropConfig
from utils.data.augment.per_image import eval_transform
from utils.data.device_loader import CachedMultiCropLoader
from utils.data.folders import build_image_dataset, has_labels
from utils.data.image_cache import CachedImages, default_cache_dir
from utils.data.image_cache_build import cached_image_dataset
from utils.data.sampling import ResumableSampler, SeededSamples
from utils.runtime.distributed import DistributedContext, barrier, is_main_process
from utils.runtime.errors import UsageError
from utils.runtime.monitoring import log

__all__ = [
    "AUTO_CACHE_BYTES",
    "attention_images",
    "build_cached_loader",
    "build_train_loader",
    "check_batch_fits",
    "image_area",
    "knn_datasets",
    "open_cache",
    "resolve_image_cache",
]


def _ignore_stop_signals(worker_id: int) -> None:
    """``DataLoader`` worker init: SIGINT, SIGTERM, SIGUSR1 and SIGUSR2 ignored, whatever handlers the main process
    had installed. The main process alone reacts to them (graceful stop) and ends its workers; a signal sent to the
    whole job does not kill a worker mid-stop."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def build_train_loader(args, dataset, ctx: DistributedContext) -> DataLoader:
    """Multi-crop batches ``(crops, labels, n_skipped)``: resumable, seeded per sample, skipping bad images.

    Worker processes ignore the stop signals (:func:`_ignore_stop_signals`)."""
    sampler = ResumableSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, seed=args.seed)
    loader = DataLoader(
        SeededSamples(dataset, args.seed, ctx.rank),
        sampler=sampler,
        batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers,
        pin_memory=ctx.device.type == "cuda",
        drop_last=True,
        persistent_workers=args.num_workers > 0,
        worker_init_fn=_ignore_stop_signals,
        generator=torch.Generator().manual_seed(args.seed),  # the loader's own draws never touch the global RNG
    )
    if len(loader) == 0:
        raise UsageError(
            f"the dataset has {len(dataset)} images, fewer than one batch of {args.batch_size_per_gpu} per process x "
            f"{ctx.world_size} processes: lower --batch_size_per_gpu"
        )
    return loader


def check_batch_fits(n_images: int, batch_size: int, world_size: int) -> None:
    """A user error (before anything is cached or written) when one process's share is smaller than one batch."""
    if -(-n_images // world_size) < batch_size:
        raise UsageError(
            f"the dataset has {n_images} images, fewer than one batch of {batch_size} per process x {world_size} "
            "processes: lower --batch_size_per_gpu"
        )


def knn_datasets(args, data_path, cache_dir=None):
    """(train, val) datasets with the evaluation transform for the online k-NN, or None (no labels, no val, off).
    With a cache folder, both read decoded pixels from it (the val split gets its own cache entry)."""
    if args.knn_every <= 0:
        return None
    transform = eval_transform(args.global_crop_size)
    train = build_image_dataset(data_path, "train", transform=transform)
    val = build_image_dataset(data_path, "val", transform=transform)
    if val is None or not has_labels(train) or not has_labels(val):
        log("online k-NN off: it needs labelled train/ and val/ splits")
        return None
    if cache_dir is not None:
        train, val = open_cache(train, cache_dir, "train", transform), open_cache(val, cache_dir, "val", transform)
    return train, val


#: Decoded size (bytes) up to which ``--cache_images auto`` caches: TinyImageNet's 100 000 images are 1.2 GB.
AUTO_CACHE_BYTES = 8 * 2**30


def image_area(dataset, tries: int = 20) -> int:
    """Pixels of the first readable image among the first ``tries`` (an unreadable file is skipped, not fatal)."""
    for path, _ in dataset.samples[:tries]:
        try:
            with Image.open(path) as image:
                return image.size[0] * image.size[1]
        except (OSError, ValueError):
            continue
    return 0


def resolve_image_cache(args, dataset, data_path, ctx: DistributedContext) -> Path | None:
    """The cache folder to use (built by the main process, the others wait), or None when not caching.
    ``auto`` caches datasets whose decoded pixels (estimated from the first image) fit :data:`AUTO_CACHE_BYTES`."""
    if args.cache_images == "off":
        return None
    if args.cache_images == "auto" and len(dataset) * image_area(dataset) * 3 > AUTO_CACHE_BYTES:
        return None
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir(data_path)
    if ctx.is_main:
        cache = open_cache(dataset, cache_dir, "train", None)
        skipped = f", {len(cache.skipped)} unreadable image(s) skipped" if cache.skipped else ""
        log(f"image cache: {len(cache)} decoded images in {cache.path}{skipped}")
    barrier()
    return cache_dir


def open_cache(dataset, cache_dir: Path, name: str, transform) -> CachedImages:
    """The cached pixels of ``dataset`` (built on first use; a changed file list rebuilds it)."""
    return cached_image_dataset(dataset, cache_dir, name=name, transform=transform, verbose=is_main_process())


def build_cached_loader(
    args, dataset, cache_dir: Path, ctx: DistributedContext, crops: MultiCropConfig
) -> CachedMultiCropLoader:
    """The fast path: uint8 batches from the cache, augmented as whole batches (multi-crop ``crops``) on the
    training device."""
    cache = open_cache(dataset, cache_dir, "train", None)
    sampler = ResumableSampler(cache, num_replicas=ctx.world_size, rank=ctx.rank, seed=args.seed)
    augment = BatchedMultiCrop(crops)
    on_device = (
        ctx.device.type == "cuda"
        and cache.images.nbytes < 0.25 * torch.cuda.get_device_properties(ctx.device).total_memory
    )
    loader = CachedMultiCropLoader(
        cache, sampler, args.batch_size_per_gpu, augment, ctx.device, args.seed, ctx.rank, images_on_device=on_device
    )
    if len(loader) == 0:
        raise UsageError(
            f"the dataset has {len(cache)} images, fewer than one batch of {args.batch_size_per_gpu} per process x "
            f"{ctx.world_size} processes: lower --batch_size_per_gpu"
        )
    return loader


def attention_images(args, data_path, count: int = 4) -> torch.Tensor | None:
    """A fixed set of ``count`` images ``[count, 3, S, S]`` (val split if any, else train; evenly spaced over the
    split, so several classes show) whose attention maps go to TensorBoard every ``--attn_every`` epochs."""
    if args.attn_every <= 0:
        return None
    transform = eval_transform(args.global_crop_size)
    dataset = build_image_dataset(data_path, "val", transform=transform)
    dataset = dataset if dataset is not None else build_image_dataset(data_path, "train", transform=transform)
    step = max(len(dataset) // count, 1)
    return torch.stack([dataset[i * step][0] for i in range(min(count, len(dataset)))])
