"""Benchmark DINO's multi-crop augmentation: the per-image PIL pipeline vs the batched tensor pipeline, one core.

(a) ``per_image``: :class:`utils.data.augment.per_image.DataAugmentationDINO` (the official recipe) called on every
    image of a list of decoded 64 x 64 PIL images held in memory, as a data-loader worker would;
(b) ``batched``: :class:`utils.data.augment.batched.BatchedMultiCrop` on the same images as one uint8 tensor
    ``[N, 3, 64, 64]``, called once per batch of ``--batch-size`` images with an integer seed per batch.

More rows for context (the target compares (b) with (a)): ``per_image_collate`` is (a) plus what a data loader
does next, stacking each batch's crops into ``[B, 3, S, S]`` tensors (``default_collate``); ``batched_out`` is (b)
writing into the previous batch's output tensors (``out=``), which spares the page faults of fresh multi-megabyte
outputs on a CPU; ``batched_tensor_ops`` is (b) without the compiled CPU kernels (``compiled=False``: tensor
operations only, as on other devices; (b) uses the kernels when Numba is installed, see the report's
``compiled_kernels``).

Same crops for both (2 global + ``--local-crops-number`` local, default 2 x 128 px + 2 x 64 px). Images are the
embedded synthetic dataset's (``utils.data.synthetic.render_sample``: shapes, textures, noise), rendered in memory.
Everything runs on one core: ``torch.set_num_threads(1)`` (PIL is single-threaded). Each repeat times both
pipelines back to back (order alternating), so that background load hits them alike; per pipeline the report
gives images/s from wall time (median, min, max over repeats) and from this process's CPU time (less sensitive to
other processes on a shared machine), and the speedup batched / per-image of the medians.

    python benchmarks/bench_augment.py                      # 512 images, batches of 128, 5 repeats
    python benchmarks/bench_augment.py --quick --json out.json

The last line of stdout is the JSON report.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_common import add_host_memory_flag, emit_report  # noqa: E402
from utils.data.augment.batched import BatchedMultiCrop, uses_compiled_kernels  # noqa: E402
from utils.data.augment.config import MultiCropConfig  # noqa: E402
from utils.data.augment.per_image import DataAugmentationDINO  # noqa: E402
from utils.data.synthetic import SYNTHETIC_CLASSES, render_sample  # noqa: E402
from utils.runtime.host_memory import configure_host_memory  # noqa: E402

METHODS = ("per_image", "per_image_collate", "batched", "batched_out", "batched_tensor_ops")
TARGET_SPEEDUP = 3.0
FULL = {"num_images": 512, "batch_size": 128, "repeats": 5}
QUICK = {"num_images": 16, "batch_size": 8, "repeats": 2}


def make_images(num_images: int, image_size: int, seed: int) -> tuple[list, torch.Tensor]:
    """``num_images`` synthetic RGB images as PIL images and as one uint8 tensor ``[N, 3, S, S]``."""
    rng = np.random.default_rng(seed)
    pil_images = [render_sample(i % len(SYNTHETIC_CLASSES), rng, image_size) for i in range(num_images)]
    tensor = torch.from_numpy(np.stack([np.asarray(im) for im in pil_images])).permute(0, 3, 1, 2).contiguous()
    return pil_images, tensor


def run_per_image(augment: DataAugmentationDINO, pil_images: list) -> list:
    return [augment(image) for image in pil_images]


def run_per_image_collate(augment: DataAugmentationDINO, pil_images: list, batch_size: int) -> list:
    batches = []
    for i in range(0, len(pil_images), batch_size):
        crops = [augment(image) for image in pil_images[i : i + batch_size]]
        batches.append([torch.stack(view) for view in zip(*crops)])
    return batches


def run_batched(augment: BatchedMultiCrop, images: torch.Tensor, batch_size: int, seed: int, reuse: bool) -> list:
    outputs, previous = [], None
    for i in range(0, images.shape[0], batch_size):
        batch = images[i : i + batch_size]
        out = previous if reuse and previous is not None and previous[0].shape[0] == batch.shape[0] else None
        previous = augment(batch, seed + i, out=out)
        outputs.append(previous)
    return outputs


def time_methods(cfg: dict) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds of each method over the whole image set: one warm-up, then ``repeats`` rounds."""
    crops = MultiCropConfig(
        local_crops_number=cfg["local_crops_number"],
        global_crop_size=cfg["global_crop_size"],
        local_crop_size=cfg["local_crop_size"],
    )
    per_image = DataAugmentationDINO(crops)
    batched = BatchedMultiCrop(crops, interpolation=cfg["interpolation"], chunk_size=cfg["chunk_size"])
    tensor_ops = BatchedMultiCrop(
        crops, interpolation=cfg["interpolation"], chunk_size=cfg["chunk_size"], compiled=False
    )
    pil_images, images = make_images(cfg["num_images"], cfg["image_size"], cfg["seed"])
    random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    bs = cfg["batch_size"]
    calls = {
        "per_image": lambda: run_per_image(per_image, pil_images),
        "per_image_collate": lambda: run_per_image_collate(per_image, pil_images, bs),
        "batched": lambda: run_batched(batched, images, bs, cfg["seed"], reuse=False),
        "batched_out": lambda: run_batched(batched, images, bs, cfg["seed"], reuse=True),
        "batched_tensor_ops": lambda: run_batched(tensor_ops, images, bs, cfg["seed"], reuse=False),
    }
    check_outputs(calls["per_image"](), calls["batched"](), cfg)  # warm-up and sanity check
    calls["per_image_collate"](), calls["batched_out"](), calls["batched_tensor_ops"]()
    times: dict[str, dict[str, list[float]]] = {m: {"wall": [], "cpu": []} for m in METHODS}
    for repeat in range(cfg["repeats"]):
        for method in METHODS if repeat % 2 == 0 else METHODS[::-1]:  # alternate the order
            wall, cpu = time.perf_counter(), time.process_time()
            calls[method]()
            times[method]["cpu"].append(time.process_time() - cpu)
            times[method]["wall"].append(time.perf_counter() - wall)
    return times


def check_outputs(per_image: list, batched: list, cfg: dict) -> None:
    """Both pipelines give 2 + n views of the configured sizes for every image."""
    views = 2 + cfg["local_crops_number"]
    sizes = [cfg["global_crop_size"]] * 2 + [cfg["local_crop_size"]] * cfg["local_crops_number"]
    assert len(per_image) == cfg["num_images"] and all(len(crops) == views for crops in per_image)
    for v, size in enumerate(sizes):
        assert tuple(per_image[0][v].shape) == (3, size, size)
        assert sum(batch[v].shape[0] for batch in batched) == cfg["num_images"]
        assert all(tuple(batch[v].shape[1:]) == (3, size, size) for batch in batched)


def summarise(cfg: dict, times: dict) -> dict:
    """The JSON report."""
    n = cfg["num_images"]
    results = {}
    for method in METHODS:
        wall, cpu = times[method]["wall"], times[method]["cpu"]
        rates = [n / t for t in wall]
        results[method] = {
            "times_s": wall,
            "cpu_times_s": cpu,
            "images_per_s": statistics.median(rates),
            "images_per_s_min": min(rates),
            "images_per_s_max": max(rates),
            "images_per_s_cpu": n / statistics.median(cpu),
        }
    a, b = results["per_image"], results["batched"]
    speedup = b["images_per_s"] / a["images_per_s"]
    for r in results.values():
        r["speedup_vs_per_image"] = r["images_per_s"] / a["images_per_s"]
    return {
        "config": {
            **cfg,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "pillow": PIL.__version__,
            "compiled_kernels": uses_compiled_kernels(torch.device("cpu")),
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
        "results": results,
        "speedup": speedup,
        "speedup_best_of": b["images_per_s_max"] / a["images_per_s_max"],
        "speedup_cpu_time": b["images_per_s_cpu"] / a["images_per_s_cpu"],
        "per_repeat_speedups": [ta / tb for ta, tb in zip(times["per_image"]["wall"], times["batched"]["wall"])],
        "target_speedup": TARGET_SPEEDUP,
        "target_met": speedup >= TARGET_SPEEDUP,
    }


def format_table(report: dict) -> str:
    """Human-readable summary."""
    cfg = report["config"]
    crops = f"2 x {cfg['global_crop_size']} px + {cfg['local_crops_number']} x {cfg['local_crop_size']} px"
    lines = [
        f"multi-crop augmentation: {cfg['num_images']} images of {cfg['image_size']} px, {crops}, batches of "
        f"{cfg['batch_size']}, {cfg['repeats']} repeats, {cfg['torch_threads']} torch thread(s), "
        f"{cfg['cpu_count']} CPUs, batched interpolation {cfg['interpolation']}, host memory {cfg['host_memory']}, "
        f"compiled CPU kernels {'on' if cfg['compiled_kernels'] else 'off (numba not installed)'}",
        f"{'method':<20}{'img/s median':>14}{'min':>10}{'max':>10}{'img/s (cpu)':>14}{'vs per_image':>14}",
    ]
    for method, r in report["results"].items():
        lines.append(
            f"{method:<20}{r['images_per_s']:>14.1f}{r['images_per_s_min']:>10.1f}{r['images_per_s_max']:>10.1f}"
            f"{r['images_per_s_cpu']:>14.1f}{r['speedup_vs_per_image']:>13.2f}x"
        )
    lines.append(
        f"speedup batched / per-image: {report['speedup']:.2f}x (median wall), {report['speedup_best_of']:.2f}x "
        f"(best of), {report['speedup_cpu_time']:.2f}x (cpu time); target {report['target_speedup']:.1f}x: "
        f"{'met' if report['target_met'] else 'NOT met'}"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny run for the test suite (16 images, 2 repeats)")
    parser.add_argument("--num-images", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--global-crop-size", type=int, default=128)
    parser.add_argument("--local-crop-size", type=int, default=64)
    parser.add_argument("--local-crops-number", type=int, default=2)
    parser.add_argument("--interpolation", default="bicubic", choices=["bicubic", "bilinear"])
    parser.add_argument("--chunk-size", type=int, default=None, help="BatchedMultiCrop's chunk_size (default: auto)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: one core)")
    parser.add_argument("--seed", type=int, default=0)
    add_host_memory_flag(parser, "both pipelines run under it", flag="--host-memory")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON report here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    host_memory = configure_host_memory(args.host_memory)
    preset = QUICK if args.quick else FULL
    cfg = {
        "num_images": args.num_images or preset["num_images"],
        "batch_size": args.batch_size or preset["batch_size"],
        "repeats": args.repeats or preset["repeats"],
        "image_size": args.image_size,
        "global_crop_size": args.global_crop_size,
        "local_crop_size": args.local_crop_size,
        "local_crops_number": args.local_crops_number,
        "interpolation": args.interpolation,
        "chunk_size": args.chunk_size,
        "seed": args.seed,
        "quick": args.quick,
        "host_memory": host_memory,
    }
    report = summarise(cfg, time_methods(cfg))
    print(format_table(report))
    return emit_report(report, args.json)


if __name__ == "__main__":
    main()
