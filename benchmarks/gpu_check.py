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
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import itertools
import json
import math
import platform
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import main_dino  # noqa: E402
from benchmarks.bench_common import base_parser, emit_report, preset_config  # noqa: E402
from utils.data.synthetic import generate_synthetic_dataset  # noqa: E402
from utils.model.vit import group_by_resolution  # noqa: E402
from utils.runtime.distributed import init_distributed_mode  # noqa: E402
from utils.train.optim import resolve_precision  # noqa: E402
from utils.train.run import DINOPretraining  # noqa: E402
from utils.train.step import StepSchedule, train_step  # noqa: E402

#: The original notebook's job (images per epoch of TinyImageNet's train split, epochs) for the projection.
NOTEBOOK_IMAGES, NOTEBOOK_EPOCHS = 100_000, 300
PRECISIONS = ("fp32", "bf16", "fp16")
#: Relative tolerance of a precision's loss after the identical steps against fp32's: rounding (bf16 keeps 8
#: significant bits, 0.4% per value) moves it far less; a gap beyond this is a numerical fault (overflow, underflow,
#: logits rounded before the loss, loss-scale back-offs skipping many updates).
LOSS_RTOL = 0.02
#: Largest absolute difference (normalised pixel values) of the device's augmentation from the CPU reference with
#: fp32 arithmetic; with TF32 (10-bit mantissa inputs to the resize's matrix products and the blur's convolution):
#: relative input rounding 2**-11 per pass, about 5e-3 of the [0, 1] range after two passes and the colour jitter's
#: factors, divided by ImageNet's std (~0.225).
AUG_ATOL_FP32, AUG_ATOL_TF32 = 1e-4, 3e-2
#: Fraction of augmented values allowed beyond the tolerance: a rounding difference can flip a sample's value across
#: the solarisation threshold or a hue sector boundary (a large difference in a few isolated pixels).
AUG_OUTLIER_FRACTION = 1e-4
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


# ---- building runs as main_dino does ----------------------------------------------------------------------------


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


# ---- sections ---------------------------------------------------------------------------------------------------


def device_info(check: Check) -> dict:
    """What the device is and what it runs: name, versions, capability, memory, TF32 flags, the auto precision."""
    info = {
        "device": str(check.device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "auto_precision": resolve_precision("auto", check.device),
    }
    if check.device.type == "cuda":
        props = torch.cuda.get_device_properties(check.device)
        info |= {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": props.total_memory / 2**30,
            "cudnn": torch.backends.cudnn.version(),
            "bf16_supported": torch.cuda.is_bf16_supported(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        }
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def matmul_peak(check: Check) -> dict:
    """TFLOP/s of an ``n x n`` matrix product per dtype (best of 5 after a warm-up)."""
    n, peaks = check.cfg["matmul_n"], {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        try:
            a = torch.randn(n, n, device=check.device, dtype=dtype)
            b = torch.randn(n, n, device=check.device, dtype=dtype)
            a @ b
            best = math.inf
            for _ in range(5):
                check.sync()
                start = time.perf_counter()
                a @ b
                check.sync()
                best = min(best, time.perf_counter() - start)
            peaks[precision] = 2 * n**3 / best / 1e12
        except Exception as error:  # a dtype the device lacks is reported, the others still run
            peaks[precision] = describe(error)
    return peaks


def count_flops(check: Check) -> dict:
    """Backbone-only FLOPs of one step and the whole step's, counted on one batch."""
    run = check.run(precision="fp32")
    crops = device_batches(check, run, 1)[0]
    student, teacher = run.student_module, run.teacher
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as backbone:
        with torch.no_grad():
            teacher.backbone(torch.cat(crops[:2]))
        features = torch.cat([student.backbone(torch.cat(group)) for group in group_by_resolution(crops)])
        features.float().sum().backward()
    student.zero_grad(set_to_none=True)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as whole:
        step(run, crops)
    return {"backbone_per_step": backbone.get_total_flops(), "step": whole.get_total_flops()}


def precision_check(check: Check, report: dict) -> dict:
    """Identical steps in each precision from the same weights; then the step's speed with the default flags."""
    cfg, results, initial = check.cfg, {}, None
    data_run = check.run(cache_images="on", batched_aug="on", num_workers=0)
    fixed = device_batches(check, data_run, cfg["distinct_batches"])
    del data_run
    for precision in PRECISIONS:
        result = results[precision] = {}
        try:
            run = check.run(precision=precision, drop_path_rate=0.0)
            if initial is None:
                initial = {"student": copy.deepcopy(run.student_module.state_dict())}
                initial["teacher"] = copy.deepcopy(run.teacher.state_dict())
            result |= identical_steps(run, initial, fixed, cfg["agree_steps"])
            run = None
            release_memory()
            result |= step_speed(check, precision, fixed[0], report)
        except Exception as error:  # one precision's failure is reported, the others still run
            result["error"] = describe(error)
        finally:
            run = None
            release_memory()
    reference = results["fp32"].get("loss_last")
    for precision in PRECISIONS:
        loss = results[precision].get("loss_last")
        if reference is not None and loss is not None:
            gap = abs(loss - reference) / abs(reference)
            results[precision] |= {"relative_gap_to_fp32": gap, "agrees_with_fp32": gap <= LOSS_RTOL}
    return results


def identical_steps(run: DINOPretraining, initial: dict, fixed: list, n: int) -> dict:
    """``n`` steps of ``run`` from the ``initial`` student and teacher weights on the ``fixed`` batches in turn."""
    run.student_module.load_state_dict(initial["student"])
    run.teacher.load_state_dict(initial["teacher"])
    torch.manual_seed(0)
    values = [step(run, fixed[i % len(fixed)]) for i in range(n)]
    losses = torch.stack([v.loss for v in values]).tolist()
    return {
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": losses,
        "skipped": torch.stack([v.skipped for v in values]).sum().item(),  # non-finite loss
        "scaler_backoffs": torch.stack([v.scaler_backoff for v in values]).sum().item(),
    }


def step_speed(check: Check, precision: str, crops: list[torch.Tensor], report: dict) -> dict:
    """Images/s of the step with the default flags at ``precision``, the backbone's MFU and peak device memory."""
    cfg = check.cfg
    run = check.run(precision=precision)
    feed = itertools.repeat(crops)
    time_steps(check, run, feed, cfg["warmup"])
    if check.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(check.device)
    seconds = time_steps(check, run, feed, cfg["repeats"]) / cfg["repeats"]
    result = {"step_s": seconds, "images_per_s": cfg["batch"] / seconds}
    if check.device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(check.device) / 2**30
    flops, peak = report.get("flops", {}).get("backbone_per_step"), report.get("matmul_peak_tflops", {}).get(precision)
    if isinstance(flops, int) and isinstance(peak, float):
        result["backbone_tflops"] = flops / seconds / 1e12
        result["mfu"] = result["backbone_tflops"] / peak
    return result


class SyncSpy(TorchDispatchMode):
    """Counts scalar reads (``aten::_local_scalar_dense``) and copies of unpinned CPU tensors to another device."""

    def __init__(self):
        super().__init__()
        self.scalar_reads = self.unpinned_copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.scalar_reads += 1
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            target = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device")
            if (
                isinstance(source, torch.Tensor)
                and source.device.type == "cpu"
                and target is not None
                and torch.device(target).type != "cpu"
                and not source.is_pinned()
            ):
                self.unpinned_copies += 1
        return func(*args, **kwargs)


def count_syncs(check: Check, iteration: Callable[[], None], n: int) -> dict:
    """Synchronisations per call of ``iteration`` over ``n`` calls (after one uncounted call)."""
    iteration()
    check.sync()
    counts = {}
    if check.device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(n):
                    iteration()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        counts["cuda_syncs"] = len(syncs) / n
        counts["cuda_sync_sources"] = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
    else:
        counts["cuda_syncs"] = "n/a"
    spy = SyncSpy()
    with spy:
        for _ in range(n):
            iteration()
    check.sync()
    return counts | {"scalar_reads": spy.scalar_reads / n, "unpinned_h2d_copies": spy.unpinned_copies / n}


def host_syncs(check: Check) -> dict:
    """Per iteration, at ``--precision auto``: the step alone and the whole iteration (cached loader + step)."""
    run = check.run(cache_images="on", batched_aug="on", num_workers=0)
    feed = batches(run)
    fixed = [c.to(check.device, copy=True) for c in next(feed)]
    n = check.cfg["sync_steps"]
    return {
        "step": count_syncs(check, lambda: step(run, fixed), n),
        "iteration": count_syncs(check, lambda: step(run, next(feed)), n),
    }


#: Alternating rounds of ``repeats`` loader-fed and fixed-batch steps per pipeline.
DATA_ROUNDS = 3
#: The two data pipelines of ``main_dino`` (flags beyond the check's own).
PIPELINES = {
    "cache_batched": {"cache_images": "on", "batched_aug": "on", "num_workers": 0},
    "per_image_workers": {"cache_images": "off", "batched_aug": "off"},
}


def data_wait(check: Check) -> dict:
    """Per pipeline: images/s end to end and fed a fixed device batch, and the fraction of time spent waiting."""
    results = {}
    for name, flags in PIPELINES.items():
        try:
            results[name] = pipeline_wait(check, flags)
        except Exception as error:  # one pipeline's failure is reported, the other still runs
            results[name] = {"error": describe(error)}
        finally:
            release_memory()
    return results


def pipeline_wait(check: Check, flags: dict) -> dict:
    """One pipeline of :func:`data_wait`: a run built with ``flags``, its loader against a fixed batch."""
    cfg = check.cfg
    run = check.run(**flags)
    feed = batches(run)
    fixed = itertools.repeat([c.to(check.device, copy=True) for c in next(feed)])
    time_steps(check, run, feed, cfg["warmup"])
    time_steps(check, run, fixed, cfg["warmup"])
    loop = compute = 0.0
    for _ in range(DATA_ROUNDS):  # alternated, so that a change of load hits both alike
        loop += time_steps(check, run, feed, cfg["repeats"])
        compute += time_steps(check, run, fixed, cfg["repeats"])
    feed.close()  # stops the loader's workers or prefetch thread
    images = cfg["batch"] * cfg["repeats"] * DATA_ROUNDS
    return {
        "num_workers": run.args.num_workers,
        "images_per_s": images / loop,
        "images_per_s_fixed_batch": images / compute,
        "wait_fraction": min(max(1.0 - compute / loop, 0.0), 1.0),
    }


@contextlib.contextmanager
def tf32(mode: str):
    """TF32 for matrix products and cuDNN convolutions: ``default`` (as they are), ``on`` or ``off``."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if mode != "default":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "on"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def augmentation_check(check: Check) -> dict:
    """The run's batched augmentation on the device vs on the CPU (the same images and seed)."""
    run = check.run(cache_images="on", batched_aug="on", num_workers=0)
    augment = run.loader.augment
    del run
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (check.cfg["batch"], 3, 64, 64), dtype=torch.uint8, generator=generator)
    reference = copy.deepcopy(augment).to("cpu")(images, 1234)
    on_device = copy.deepcopy(augment).to(check.device)
    if check.device.type == "cpu":
        if not hasattr(on_device, "compiled"):
            return {"skipped": "the augmentation has no tensor path apart from the CPU reference"}
        on_device.compiled = False  # the tensor path: what every other device runs
        modes = {"default": AUG_ATOL_FP32}
    else:
        modes = {"default": AUG_ATOL_TF32, "off": AUG_ATOL_FP32, "on": AUG_ATOL_TF32}
    result = {}
    for mode, atol in modes.items():
        with tf32(mode):
            views = on_device(images.to(check.device), 1234)
        diff = torch.cat([(v.cpu() - r).abs().flatten() for v, r in zip(views, reference)])
        beyond = (diff > atol).float().mean().item()
        kept = max(1, math.ceil((1.0 - AUG_OUTLIER_FRACTION) * diff.numel()))
        result[f"tf32_{mode}"] = {
            "max_abs_diff": diff.max().item(),
            "mean_abs_diff": diff.mean().item(),
            "needed_atol": diff.kthvalue(kept).values.item(),  # the tolerance all but the allowed outliers need
            "atol": atol,
            "fraction_beyond_atol": beyond,
            "agrees": beyond <= AUG_OUTLIER_FRACTION,
        }
    return result


def compile_check(check: Check) -> dict:
    """``--compile`` against the plain step at ``--precision auto`` on a fixed device batch."""
    cfg, seconds = check.cfg, {}
    data_run = check.run(cache_images="on", batched_aug="on", num_workers=0)
    crops = device_batches(check, data_run, 1)[0]
    del data_run
    result = {}
    for name, flags in (("plain", {}), ("compiled", {"compile": True})):
        run = check.run(**flags)
        feed = itertools.repeat(crops)
        first = time_steps(check, run, feed, cfg["warmup"])
        seconds[name] = time_steps(check, run, feed, cfg["repeats"]) / cfg["repeats"]
        result[f"{name}_step_s"], result[f"{name}_first_steps_s"] = seconds[name], first
        run = None
        release_memory()
    result["speedup"] = seconds["plain"] / seconds["compiled"]
    return result


def projection(report: dict) -> dict:
    """The notebook's job at the end-to-end rate of the cache + batched augmentation (else the step's rate)."""
    rate = report.get("data_wait", {}).get("cache_batched", {}).get("images_per_s")
    source = "data_wait.cache_batched"
    if rate is None:
        rate, source = report.get("precision", {}).get("fp32", {}).get("images_per_s"), "precision.fp32"
    if not rate:
        raise RuntimeError("no images/s measured")
    seconds = NOTEBOOK_EPOCHS * NOTEBOOK_IMAGES / rate
    return {
        "epochs": NOTEBOOK_EPOCHS,
        "images_per_epoch": NOTEBOOK_IMAGES,
        "images_per_s": rate,
        "source": source,
        "seconds": seconds,
        "hours": seconds / 3600,
    }


# ---- the report -------------------------------------------------------------------------------------------------


def describe(error: BaseException) -> str:
    where = traceback.extract_tb(error.__traceback__)[-1]
    return f"{type(error).__name__}: {error} ({Path(where.filename).name}:{where.lineno})"


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
