"""What a person watches: console progress with rate and ETA, ``log.txt`` JSON lines, TensorBoard scalars and images.

Only the main process (rank 0) writes; on other ranks every writer here is a silent no-op.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, TextIO

import torch

from utils.runtime.distributed import is_main_process


def log(message: str, *, all_ranks: bool = False, file: TextIO | None = None) -> None:
    """Print ``message`` on the main process only (on every process with ``all_ranks``), to ``file`` (default
    stdout), flushed so that SLURM logs and pipes show it at once."""
    if all_ranks or is_main_process():
        print(message, file=file or sys.stdout, flush=True)


def format_duration(seconds: float) -> str:
    """``3725`` → ``1:02:05``."""
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def memory_mb(device: torch.device) -> float:
    """Peak memory of the device in MiB (CUDA's allocator), or this process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:  # Windows
        return 0.0


class ProgressMeter:
    """Console progress of a loop of ``total`` iterations: ``header [i/total] eta  name value ...  img/s  mem``.

    ``update(n_images, **scalars)`` records one iteration (scalars are floats); every ``print_freq`` iterations and at
    the last one a line is printed with the running averages since the last line.
    """

    def __init__(self, total: int, header: str, device: torch.device, print_freq: int = 10, start: int = 0):
        self.total, self.header, self.device, self.print_freq = total, header, device, max(print_freq, 1)
        self.done = start
        self.start_time = self.window_time = time.perf_counter()
        self.window_images = 0
        self.window: dict[str, list[float]] = defaultdict(list)
        self.epoch_sums: dict[str, float] = defaultdict(float)
        self.epoch_counts: dict[str, int] = defaultdict(int)
        self.first = start

    def update(self, n_images: int, **scalars: float) -> None:
        self.done += 1
        self.window_images += n_images
        for key, value in scalars.items():
            self.window[key].append(value)
            self.epoch_sums[key] += value
            self.epoch_counts[key] += 1
        if (self.done - self.first) % self.print_freq == 0 or self.done == self.total:
            self._print_line()

    def images_per_second(self) -> float:
        return self.window_images / max(time.perf_counter() - self.window_time, 1e-9)

    def _print_line(self) -> None:
        now = time.perf_counter()
        rate = self.images_per_second()
        per_iter = (now - self.start_time) / max(self.done - self.first, 1)
        eta = per_iter * (self.total - self.done)
        values = "  ".join(f"{k} {sum(v) / len(v):.4g}" for k, v in self.window.items() if v)
        width = len(str(self.total))
        log(
            f"{self.header} [{self.done:>{width}}/{self.total}]  eta {format_duration(eta)}  {values}  "
            f"{rate:.1f} img/s  mem {memory_mb(self.device):.0f} MB"
        )
        self.window.clear()
        self.window_images = 0
        self.window_time = now

    def averages(self) -> dict[str, float]:
        """Mean of every scalar over all iterations recorded so far."""
        return {k: self.epoch_sums[k] / self.epoch_counts[k] for k in self.epoch_sums if self.epoch_counts[k]}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start_time


def append_json_line(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON object as a line to ``path`` (``log.txt``), on the main process only."""
    if not is_main_process():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


class TensorBoard:
    """A ``SummaryWriter`` on the main process, a no-op elsewhere (or when TensorBoard is not installed)."""

    def __init__(self, log_dir: str | Path | None):
        self.writer = None
        if log_dir is None or not is_main_process():
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)", file=sys.stderr)
            return
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(prefix + key, value, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def image(self, tag: str, image_chw: torch.Tensor, step: int) -> None:
        """``image_chw``: float ``[3, H, W]`` in [0, 1] or uint8."""
        if self.writer is not None:
            self.writer.add_image(tag, image_chw, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def flags_as_markdown(flags: dict[str, Any]) -> str:
    """The run's flags as a two-column Markdown table (TensorBoard's text tab renders it)."""
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in sorted(flags.items()))
    return "| flag | value |\n|---|---|\n" + rows
