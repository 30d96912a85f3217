"""End-to-end pretraining throughput on the embedded dataset, data loading included.

Compares, in one process run with interleaved repeats, the per-image pipeline (PIL multi-crop reading JPEGs in a
data worker, as the official recipe) with the decoded-image cache + batched augmentation on the training device.
Each measurement runs ``--iters`` iterations of ``main_dino``'s training loop (model set-up excluded) and reports
images/s; the table gives median and spread, and the ratio fast / per-image.

    python benchmarks/bench_pretrain.py                       # ViT-Tiny, 64 px global / 32 px local, batch 64
    python benchmarks/bench_pretrain.py --quick --json out.json

The last line of stdout is the JSON report.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import main_dino  # noqa: E402
from benchmarks.bench_common import add_host_memory_flag, emit_report  # noqa: E402
from utils.data.synthetic import generate_synthetic_dataset  # noqa: E402
from utils.runtime.distributed import init_distributed_mode  # noqa: E402
from utils.runtime.host_memory import configure_host_memory  # noqa: E402
from utils.train.run import DINOPretraining  # noqa: E402

PIPELINES = {
    "per_image_jpeg_worker": ["--cache_images", "off", "--batched_aug", "off", "--num_workers", "1"],
    "cache_batched": ["--cache_images", "on", "--batched_aug", "on", "--num_workers", "0"],
}
FULL = {"iters": 20, "batch": 64, "global": 64, "local": 32, "out_dim": 4096, "repeats": 3, "per_class": 300}
QUICK = {"iters": 2, "batch": 8, "global": 32, "local": 16, "out_dim": 256, "repeats": 1, "per_class": 4}


def measure(data: Path, cfg: dict, pipeline: list[str], device: str) -> float:
    """Images/s of ``cfg['iters']`` training iterations (set-up excluded)."""
    with tempfile.TemporaryDirectory() as out:
        flags = [
            "--data_path",
            str(data),
            "--output_dir",
            out,
            "--epochs",
            "100",
            "--max_iters",
            str(cfg["iters"]),
            "--batch_size_per_gpu",
            str(cfg["batch"]),
            "--global_crop_size",
            str(cfg["global"]),
            "--local_crop_size",
            str(cfg["local"]),
            "--out_dim",
            str(cfg["out_dim"]),
            "--knn_every",
            "0",
            "--print_freq",
            "1000",
            "--device",
            device,
            *pipeline,
        ]
        args = main_dino.get_args_parser().parse_args(flags)
        ctx = init_distributed_mode(device)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            run = DINOPretraining(args, ctx)
            start = time.perf_counter()
            run.run()
            elapsed = time.perf_counter() - start
        del run
    return cfg["iters"] * cfg["batch"] / elapsed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's smoke run)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--iters", type=int, default=None, help="training iterations per measurement")
    parser.add_argument("--repeats", type=int, default=None, help="measurements per pipeline")
    parser.add_argument("--data_path", default=None, help="embedded dataset folder (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the JSON report to this file")
    add_host_memory_flag(parser, "both pipelines (and their forked workers) run under it")
    args = parser.parse_args(argv)
    host_memory = configure_host_memory(args.host_memory)
    cfg = dict(QUICK if args.quick else FULL)
    cfg.update({k: v for k, v in (("iters", args.iters), ("repeats", args.repeats)) if v})
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data_path) if args.data_path else Path(tmp) / "synthetic"
        generate_synthetic_dataset(data, train_per_class=cfg["per_class"], val_per_class=2)
        measure(data, cfg, PIPELINES["cache_batched"], args.device)  # builds the cache, warms up
        rates: dict[str, list[float]] = {name: [] for name in PIPELINES}
        for _ in range(cfg["repeats"]):
            for name, flags in PIPELINES.items():
                rates[name].append(measure(data, cfg, flags, args.device))
    medians = {name: statistics.median(v) for name, v in rates.items()}
    report = {
        "config": {
            **cfg,
            "device": args.device,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "host_memory": host_memory,
        },
        "images_per_s": {
            name: {"median": medians[name], "min": min(v), "max": max(v), "all": v} for name, v in rates.items()
        },
        "speedup": medians["cache_batched"] / medians["per_image_jpeg_worker"],
    }
    print(
        f"end-to-end pretraining, {cfg['iters']} iterations of batch {cfg['batch']}, device {args.device}, "
        f"host memory {host_memory}"
    )
    print(f"{'pipeline':<24} {'img/s (median)':>15} {'min':>8} {'max':>8}")
    for name, r in report["images_per_s"].items():
        print(f"{name:<24} {r['median']:>15.1f} {r['min']:>8.1f} {r['max']:>8.1f}")
    print(f"speed-up of the cache + batched augmentation: {report['speedup']:.2f}x")
    return emit_report(report, args.json)


if __name__ == "__main__":
    main()
