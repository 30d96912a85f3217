"""Small helpers shared by several test modules (fixtures live in ``tests/conftest.py``)."""

from __future__ import annotations

import json
from pathlib import Path


def read_json_lines(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file (``log.txt``, ``knn_results.json``, ``linear_results.json``), in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def eval_flags(checkpoint, data, out, *extra: str) -> list[str]:
    """An evaluation script's flags for ``checkpoint`` on the 32 px images at ``data``, loaded in the main process,
    writing to ``out``, then ``extra``."""
    where = ["--pretrained_weights", str(checkpoint), "--data_path", str(data), "--output_dir", str(out)]
    return [*where, "--image_size", "32", "--num_workers", "0", *extra]
