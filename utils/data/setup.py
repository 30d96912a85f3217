"""Turn the data flags (``--dataset``, ``--data_path``, ``--download``) into a prepared dataset folder."""

from __future__ import annotations

from pathlib import Path

from utils.data.synthetic import generate_synthetic_dataset
from utils.data.tinyimagenet import download_tiny_imagenet
from utils.runtime.distributed import barrier
from utils.runtime.errors import DatasetError

DEFAULT_DATA_PATHS = {"folder": "data/tiny-imagenet-200", "synthetic": "data/synthetic"}


def prepare_data_path(dataset: str, data_path: str | None, download: bool, is_main: bool = True) -> Path:
    """The folder to read images from, after generating (``synthetic``) or downloading (``--download``) it.

    Only the main process writes; the others wait for it. Without ``--download`` a missing folder is left for
    :func:`utils.data.folders.build_image_dataset` to report (with a message naming ``--download``).
    """
    if dataset not in DEFAULT_DATA_PATHS:
        raise DatasetError(f"unknown --dataset {dataset!r}: use {' or '.join(DEFAULT_DATA_PATHS)}")
    path = Path(data_path or DEFAULT_DATA_PATHS[dataset])
    if is_main:
        if dataset == "synthetic":
            generate_synthetic_dataset(path)
        elif download:
            download_tiny_imagenet(path)
    barrier()
    return path
