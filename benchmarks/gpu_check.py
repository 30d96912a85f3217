"""Check a training device with one command: precision, speed, data wait, host synchronisations, augmentation.

The first command to run on a GPU (sized to finish within 8 minutes on one GPU; ``--quick`` on a CPU in the test
suite):

    python benchmarks/gpu_check.py                        # the training device (CUDA when available)
    python benchmarks/gpu_check.py --device cpu --quick   # tiny sizes, seconds to a minute on a CPU
    python benchmarks/gpu_check.py --skip compile --json gpu_check.json

Everything is built as ``main_dino.py`` builds it: flags parsed by ``main_dino.get_args_parser()``, the run object
:class:`utils.train.run.DINOPretraining` (models, loss, optimiser, grad scaler, data loader), one iteration by
:func:`utils.train.step.train_step`. The full preset is the original notebook's job: ViT-Tiny/16, 2 x 128 px + 2 x 64 px
crops, batch 256, out_dim 65536, on 64 px images (an embedded synthetic dataset unless ``--data_path`` names one).

Sections (each runs on its own: one that raises reports ``{"error": ...}`` in its place and the others still run):

- ``device``: name, torch / CUDA / cuDNN versions, compute capability, memory, TF32 settings.
- ``matmul_peak_tflops``: the device's measured peak (square matrix products) in fp32, bf16 and fp16.
- ``flops``: backbone-only FLOPs of one step (teacher forward of the 2 global views, student forward and backward of
  every view; ``torch.utils.flop_counter`` with the attention computed by PyTorch's math kernel, so that its matrix
  products are counted on every device) and the whole step's FLOPs.
- ``precision``: for fp32, bf16 and fp16 (``--precision``), the loss of 30 identical steps from the same initial
  weights on the same batches (``--drop_path_rate 0``, so that nothing random differs), whether the last loss agrees
  with fp32's within :data:`LOSS_RTOL`, steps without an update (``skipped``: a non-finite loss;
  ``scaler_backoffs``: fp16's loss scale backing off); then, with the default flags, the
  step's images/s, the backbone's MFU (backbone FLOPs per second over that precision's matmul peak) and peak device
  memory (CUDA).
- ``host_syncs``: host synchronisations per iteration (the cached loader's batch and augmentation, then the step), at
  ``--precision auto``: on CUDA those ``torch.cuda.set_sync_debug_mode`` reports; on every device the scalar reads
  (``aten::_local_scalar_dense``: ``.item()``, ``bool(tensor)``, ``float(tensor)``) and the host-to-device copies
  of unpinned CPU tensors, counted by a dispatch spy (it sees the training thread only; the loader's prefetch
  thread on CUDA is covered by the sync debug mode); for the step alone (a batch already on the device) and for
  the whole iteration.
- ``data_wait``: the fraction of wall time the training loop waits for data: ``1 - t_compute / t_loop`` where
  ``t_loop`` is the time of ``n`` iterations fed by the loader and ``t_compute`` that of ``n`` steps on a batch
  already on the device (alternating rounds; clipped to [0, 1]); for the decoded-image cache + batched augmentation
  on the device, and for the per-image pipeline in data workers.
- ``augmentation``: the batched augmentation on the device against the CPU reference (same images, same seed):
  largest and mean absolute difference and the tolerance all but a fraction :data:`AUG_OUTLIER_FRACTION` of the
  values need (``needed_atol``), per setting of TF32 (``default``: PyTorch's, matrix products in fp32 and
  convolutions in TF32; ``off``; ``on``), and the fraction of values beyond :data:`AUG_ATOL_FP32` (TF32 off) or
  :data:`AUG_ATOL_TF32` (TF32 on, and default: the blur's convolutions). On a CPU, the tensor path (the one other
  devices run) against the compiled kernels.
- ``compile``: ``--compile`` against the plain step: compilation time (the first steps) and the speed-up (skipped
  by ``--quick`` on a CPU, where inductor's C++ compilation takes minutes).
- ``projection``: the original notebook's job (300 epochs of TinyImageNet's 100,000 images) on this device at the
  end-to-end images/s of the cache + batched augmentation: ``300 * 100000 / images_per_s`` seconds.

Prints a table; the last line of stdout is the JSON report (``--json FILE``: also written there, after every section).

This script is the runner and the report (the presets, the flags, failure isolation, the table); the sections and
their tolerances are in ``benchmarks/gpu_check_sections.py``, the runs they build as ``main_dino`` does in
``benchmarks/gpu_check_runs.py``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_common import base_parser, emit_report, preset_config  # noqa: E402
from benchmarks.gpu_check_runs import Check, describe, release_memory  # noqa: E402
from benchmarks.gpu_check_sections import (  # noqa: E402
    AUG_ATOL_FP32,
    AUG_ATOL_TF32,
    AUG_OUTLIER_FRACTION,
    LOSS_RTOL,
    augmentation_check,
    compile_check,
    count_flops,
    data_wait,
    device_info,
    host_syncs,
    matmul_peak,
    precision_check,
    projection,
)
from utils.data.synthetic import generate_synthetic_dataset  # noqa: E402

SECTIONS = ("matmul_peak", "flops", "precision", "host_syncs", "data_wait", "augmentation", "compile")

FULL = {
    "arch": "vit_tiny",
    "batch": 256,
    "global": 128,
    "local": 64,
    "local_crops": 2,
    "out_dim": 65536,
    "agree_steps": 30,
    "distinct_batches": 4,
    "warmup": 3,
    "repeats": 10,
    "sync_steps": 3,
    "images": 4096,
    "matmul_n": 8192,
}
QUICK = {
    "arch": "test_vit",  # timm's smallest ViT (embed_dim 64): CPUs multiply fp16 slowly
    "batch": 4,
    "global": 32,
    "local": 16,
    "local_crops": 2,
    "out_dim": 256,
    "agree_steps": 30,
    "distinct_batches": 2,
    "warmup": 1,
    "repeats": 3,
    "sync_steps": 2,
    "images": 40,
    "matmul_n": 256,
}


# ---- the report -------------------------------------------------------------------------------------------------


def run_section(report: dict, name: str, function: Callable[[], dict]) -> None:
    """``report[name] = function()``, or ``{"error": ...}`` when it raises; progress on stderr."""
    start = time.perf_counter()
    print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
    try:
        report[name] = function()
    except Exception as error:  # a failing section is reported, the rest of the check still runs
        report[name] = {"error": describe(error)}
        traceback.print_exc()
    release_memory()
    report["section_s"][name] = time.perf_counter() - start


def fmt(value, spec: str = ".3g") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def print_table(report: dict) -> None:
    d = report["device"]
    print(f"gpu_check on {d.get('name')} ({d.get('device')}), torch {d.get('torch')}, CUDA {d.get('cuda')}")
    shown = ("name", "device", "torch", "cuda")
    print("device: " + ", ".join(f"{k} {fmt(v)}" for k, v in d.items() if k not in shown))
    c = report["config"]
    print(
        f"config: {c['arch']}, 2 x {c['global']} px + {c['local_crops']} x {c['local']} px, batch {c['batch']}, "
        f"out_dim {c['out_dim']}"
    )
    peaks = report.get("matmul_peak_tflops", {})
    print("matmul peak TFLOP/s: " + ", ".join(f"{k} {fmt(v)}" for k, v in peaks.items()))
    flops = report.get("flops", {})
    print(f"FLOPs per step: backbone {fmt(flops.get('backbone_per_step'))}, whole step {fmt(flops.get('step'))}")
    print(
        f"{'precision':<10} {'loss 1st':>9} {'loss last':>10} {'gap':>8} {'ok':>5} {'no-upd':>6} {'img/s':>9} "
        f"{'MFU':>7} {'GiB':>7}"
    )
    for precision, r in report.get("precision", {}).items():
        if not isinstance(r, dict) or "error" in r:
            print(f"{precision:<10} error: {r.get('error') if isinstance(r, dict) else r}")
            continue
        print(
            f"{precision:<10} {fmt(r.get('loss_first'), '.4f'):>9} {fmt(r.get('loss_last'), '.4f'):>10} "
            f"{fmt(r.get('relative_gap_to_fp32'), '.2%'):>8} {fmt(r.get('agrees_with_fp32')):>5} "
            f"{fmt(r.get('skipped', 0) + r.get('scaler_backoffs', 0), '.0f'):>6} "
            f"{fmt(r.get('images_per_s'), '.1f'):>9} {fmt(r.get('mfu'), '.1%'):>7} "
            f"{fmt(r.get('peak_memory_gib', 'n/a'), '.2f'):>7}"
        )
    for name in ("host_syncs", "data_wait", "augmentation", "compile", "projection"):
        section = report.get(name)
        if isinstance(section, dict) and "error" not in section:
            for key, value in section.items():
                if isinstance(value, dict):
                    print(f"{name}.{key}: " + ", ".join(f"{k} {fmt(v)}" for k, v in value.items() if k != "losses"))
                else:
                    print(f"{name}.{key}: {fmt(value)}")
        else:
            print(f"{name}: {section}")


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__, "measurement (steps timed per measurement)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="the device to check")
    parser.add_argument(
        "--data_path",
        default=None,
        help="a dataset root as main_dino's --data_path, e.g. data/tiny-imagenet-200 (default: a synthetic set)",
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to leave out")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: CUDA is not available to torch {torch.__version__} (CUDA {torch.version.cuda})")
    if not args.quick and not torch.cuda.is_available():
        print("gpu_check: no GPU: the full preset takes long on a CPU (--quick: tiny sizes)", file=sys.stderr)
    cfg = preset_config(args, QUICK, FULL)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        data = Path(args.data_path) if args.data_path else scratch / "synthetic"
        if args.data_path is None:
            generate_synthetic_dataset(data, train_per_class=-(-cfg["images"] // 10), val_per_class=0)
        check = Check(cfg, args.device, data, scratch)
        report: dict = {
            "device": device_info(check),
            "config": cfg,
            "tolerances": {
                "loss_rtol": LOSS_RTOL,
                "aug_atol_fp32": AUG_ATOL_FP32,
                "aug_atol_tf32": AUG_ATOL_TF32,
                "aug_outlier_fraction": AUG_OUTLIER_FRACTION,
            },
            "section_s": {},
        }
        sections = {
            "matmul_peak_tflops": ("matmul_peak", lambda: matmul_peak(check)),
            "flops": ("flops", lambda: count_flops(check)),
            "precision": ("precision", lambda: precision_check(check, report)),
            "host_syncs": ("host_syncs", lambda: host_syncs(check)),
            "data_wait": ("data_wait", lambda: data_wait(check)),
            "augmentation": ("augmentation", lambda: augmentation_check(check)),
            "compile": ("compile", lambda: compile_check(check)),
        }
        for key, (flag, function) in sections.items():
            if flag in args.skip:
                report[key] = {"skipped": "--skip"}
            elif flag == "compile" and args.quick and check.device.type == "cpu":
                report[key] = {"skipped": "--quick on a CPU: inductor's C++ compilation takes minutes there"}
            else:
                run_section(report, key, function)
            if args.json:  # what is done so far survives an interrupted check
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        run_section(report, "projection", lambda: projection(report))
    report["total_s"] = time.perf_counter() - start
    print_table(report)
    return emit_report(report, args.json)


if __name__ == "__main__":
    main()
