"""Small helpers shared by several test modules (fixtures live in ``tests/conftest.py``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from utils.model.vit import build_dino_models


def read_json_lines(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file (``log.txt``, ``knn_results.json``, ``linear_results.json``), in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def eval_flags(checkpoint, data, out, *extra: str) -> list[str]:
    """An evaluation script's flags for ``checkpoint`` on the 32 px images at ``data``, loaded in the main process,
    writing to ``out``, then ``extra``."""
    where = ["--pretrained_weights", str(checkpoint), "--data_path", str(data), "--output_dir", str(out)]
    return [*where, "--image_size", "32", "--num_workers", "0", *extra]


def tiny_dino_models(out_dim: int = 64, seed: int = 0, use_bn_in_head: bool = False):
    """``(student, teacher)`` MultiCropWrappers of a ViT-Tiny (patch 16, 32 px global crops, no drop path) with a
    head of ``out_dim`` outputs, built after ``torch.manual_seed(seed)`` (the teacher a copy of the student)."""
    torch.manual_seed(seed)
    args = argparse.Namespace(
        arch="vit_tiny",
        patch_size=16,
        global_crop_size=32,
        drop_path_rate=0.0,
        out_dim=out_dim,
        use_bn_in_head=use_bn_in_head,
        norm_last_layer=True,
    )
    return build_dino_models(args)


def random_crops(n: int, batch: int = 4, seed: int = 1):
    """``n`` multi-crop batches of standard-normal pixels, each 2 global ``[batch, 3, 32, 32]`` then 2 local
    ``[batch, 3, 16, 16]`` crops, drawn in that order from one generator seeded ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(batch, 3, 32, 32, generator=generator) for _ in range(2)]
        + [torch.randn(batch, 3, 16, 16, generator=generator) for _ in range(2)]
        for _ in range(n)
    ]
