"""How the GPU check (``benchmarks/gpu_check.py``) builds and drives training runs exactly as ``main_dino.py`` does.

:class:`Check` holds the check's configuration, data and scratch folder and builds a
:class:`utils.train.run.DINOPretraining` from ``main_dino.get_args_parser()``'s flags (:func:`dino_args`); the helpers
run one iteration by :func:`utils.train.step.train_step` (:func:`step`), feed it the run's loader (:func:`batches`,
:func:`device_batches`), time it (:func:`time_steps`), free a dropped run's memory (:func:`release_memory`) and turn an
exception into the report's one-line ``error`` (:func:`describe`). The measurements themselves are in
``benchmarks/gpu_check_sections.py``. Imported as ``benchmarks.gpu_check_runs`` (the scripts put the repository root
on ``sys.path`` first).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import itertools
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch

import main_dino
from utils.runtime.distributed import init_distributed_mode
from utils.train.run import DINOPretraining
from utils.train.step import StepSchedule, train_step


def dino_args(cfg: dict, data_path: Path, output_dir: Path, device: str, **flags) -> argparse.Namespace:
    """``main_dino``'s flags for the check's configuration, plus ``flags`` (``name=value`` → ``--name value``)."""
    argv = [
        "--dataset", "folder",
        "--data_path", str(data_path),
        "--output_dir", str(output_dir),
        "--device", device,
        "--cache_dir", str(output_dir.parent / "cache"),
        "--arch", cfg["arch"],
        "--batch_size_per_gpu", str(cfg["batch"]),
        "--global_crop_size", str(cfg["global"]),
        "--local_crop_size", str(cfg["local"]),
        "--local_crops_number", str(cfg["local_crops"]),
        "--out_dim", str(cfg["out_dim"]),
        "--knn_every", "0",
        "--print_freq", "1000000",
        "--seed", "0",
    ]  # fmt: skip
    for name, value in flags.items():
        argv += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return main_dino.get_args_parser().parse_args(argv)


class Check:
    """The check's configuration, data and scratch folder; builds runs from ``main_dino`` flags."""

    def __init__(self, cfg: dict, device: str, data_path: Path, scratch: Path):
        self.cfg, self.data_path, self.scratch = cfg, data_path, scratch
        self.device_flag = device
        self.device = init_distributed_mode(device).device
        if self.device.type == "cuda":  # as utils.train.run.train_dino sets it
            torch.backends.cudnn.benchmark = True
        self._runs = itertools.count()

    def run(self, **flags) -> DINOPretraining:
        """A pretraining run object (models, loss, optimiser, loader) built from the flags, its output quiet."""
        args = dino_args(self.cfg, self.data_path, self.scratch / f"run{next(self._runs)}", self.device_flag, **flags)
        torch.manual_seed(args.seed)
        with contextlib.redirect_stdout(io.StringIO()):
            return DINOPretraining(args, init_distributed_mode(self.device_flag))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def release_memory() -> None:
    """Free what dropped runs held (the CUDA caching allocator's blocks too), so that the next run starts clean."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def schedule_of(run: DINOPretraining) -> StepSchedule:
    """Constant scheduled values: the peak learning rate (scaled by the batch), the weight decay, the momentum."""
    args = run.args
    lr = args.lr * args.batch_size_per_gpu / 256.0
    return StepSchedule(lr=lr, weight_decay=args.weight_decay, momentum=args.momentum_teacher)


def step(run: DINOPretraining, crops: list[torch.Tensor]):
    """One training iteration of ``run`` on ``crops`` at the epoch where every parameter trains."""
    return train_step(run.state, crops, run.args.freeze_last_layer, schedule_of(run))


def batches(run: DINOPretraining) -> Iterator[list[torch.Tensor]]:
    """The run's loader's crops, epoch after epoch."""
    for epoch in itertools.count():
        run.loader.sampler.set_epoch(epoch)
        for crops, _, _ in run.loader:
            yield crops


def device_batches(check: Check, run: DINOPretraining, count: int) -> list[list[torch.Tensor]]:
    """The first ``count`` batches of ``run``'s loader, copied to the device (a loader may reuse its buffers)."""
    return [[c.to(check.device, copy=True) for c in crops] for crops in itertools.islice(batches(run), count)]


def time_steps(check: Check, run: DINOPretraining, feed: Iterator[list[torch.Tensor]], n: int) -> float:
    """Seconds of ``n`` iterations fed by ``feed`` (device synchronised at both ends)."""
    check.sync()
    start = time.perf_counter()
    for _ in range(n):
        step(run, next(feed))
    check.sync()
    return time.perf_counter() - start


def describe(error: BaseException) -> str:
    where = traceback.extract_tb(error.__traceback__)[-1]
    return f"{type(error).__name__}: {error} ({Path(where.filename).name}:{where.lineno})"
