"""The GPU check's sections (``benchmarks/gpu_check.py``): each measures one thing on a :class:`Check`'s device.

``device`` (:func:`device_info`), ``matmul_peak_tflops`` (:func:`matmul_peak`), ``flops`` (:func:`count_flops`),
``precision`` (:func:`precision_check`), ``host_syncs`` (:func:`host_syncs`, counted by :class:`SyncSpy` and CUDA's
sync debug mode), ``data_wait`` (:func:`data_wait`), ``augmentation`` (:func:`augmentation_check`), ``compile``
(:func:`compile_check`) and ``projection`` (:func:`projection`); what each reports is in ``gpu_check.py``'s docstring,
and the tolerances they judge by are here. Each returns its part of the report as a dict; the script runs them,
isolates their failures and prints the table. Imported as ``benchmarks.gpu_check_sections`` (the scripts put the
repository root on ``sys.path`` first).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.gpu_check_runs import Check, batches, describe, device_batches, release_memory, step, time_steps
from utils.model.vit import group_by_resolution
from utils.train.optim import resolve_precision
from utils.train.run import DINOPretraining

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
