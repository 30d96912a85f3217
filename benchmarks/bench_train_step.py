"""Benchmark one DINO training step: tinydino's lean step vs the official step's structure, on the same inputs.

Reports per path the step time (median and spread over interleaved repeats), images/s and a per-phase split
(teacher forward, student forward + loss, backward, optimiser incl. clipping, EMA); the FLOPs of one step
(``torch.utils.flop_counter``), the achieved GFLOP/s and its ratio to a matmul peak measured in the same run; and the
time outside the backbone of each path, as a ratio: measured directly, by running both steps with the backbones
replaced by :class:`CachedBackbone` (everything else of the step runs: heads, loss, backward through the heads,
clipping, optimiser and EMA over all parameters), and, for reference, derived as the step minus a separately timed
backbone forward and backward (a small difference of two noisy numbers).

    python benchmarks/bench_train_step.py                 # ViT-Tiny, 2 x 128 px + 2 x 64 px, batch 32, out_dim 65536
    python benchmarks/bench_train_step.py --quick --json out.json

The last line of stdout is the JSON report.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_common import add_host_memory_flag, base_parser, emit_report, preset_config  # noqa: E402
from benchmarks.reference_step import (  # noqa: E402
    looped_dino_loss,
    official_clip_gradients,
    reference_optimizer,
    use_official_last_layer,
)
from utils.model.vit import build_dino_models, group_by_resolution  # noqa: E402
from utils.runtime.host_memory import configure_host_memory  # noqa: E402
from utils.train.loss import DINOLoss  # noqa: E402
from utils.train.optim import build_optimizer, get_params_groups, set_schedule_values  # noqa: E402
from utils.train.step import DINOState, StepSchedule, train_step  # noqa: E402

FULL = {"global": 128, "local": 64, "batch": 32, "out_dim": 65536, "local_crops": 2, "repeats": 5, "warmup": 1}
QUICK = {"global": 32, "local": 16, "batch": 4, "out_dim": 1024, "local_crops": 2, "repeats": 2, "warmup": 1}
PHASES = ("teacher_forward", "student_forward_loss", "backward", "optimizer", "ema")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(cfg: dict, device: torch.device):
    torch.manual_seed(0)
    args = argparse.Namespace(
        arch="vit_tiny",
        patch_size=16,
        global_crop_size=cfg["global"],
        drop_path_rate=0.0,
        out_dim=cfg["out_dim"],
        use_bn_in_head=False,
        norm_last_layer=True,
    )
    student, teacher = build_dino_models(args)
    return (
        student.to(device),
        teacher.to(device),
        DINOLoss(cfg["out_dim"], 2 + cfg["local_crops"], 0.04, 0.04, 0, 10).to(device),
    )


class CachedBackbone(nn.Module):
    """Stands in for a backbone when timing what lies outside it: returns the real backbone's features for each
    input shape (computed once, before timing) plus zero times one element of every backbone parameter, so that
    each parameter still gets a gradient and clipping, the optimiser and the EMA do their full work. Both paths
    pay this stand-in's small cost (a slice per parameter, a zero-filled gradient each) alike."""

    def __init__(self, backbone: nn.Module, inputs: list[torch.Tensor]):
        super().__init__()
        self.inner = backbone
        with torch.no_grad():
            self.features = {tuple(x.shape): backbone(x) for x in inputs}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features[tuple(x.shape)]
        if not torch.is_grad_enabled():
            return features
        touch = torch.stack([p.view(-1)[0] for p in self.inner.parameters() if p.requires_grad]).sum()
        return features + 0.0 * touch


def without_backbones(student: nn.Module, teacher: nn.Module, crops: list[torch.Tensor]):
    """``student`` and ``teacher`` (MultiCropWrappers) with their backbones replaced by :class:`CachedBackbone`."""
    groups = [torch.cat(group) for group in group_by_resolution(crops)]
    student.backbone = CachedBackbone(student.backbone, groups)
    teacher.backbone = CachedBackbone(teacher.backbone, groups[:1])
    return student, teacher


def make_crops(cfg: dict, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(cfg["batch"], 3, cfg["global"], cfg["global"], generator=g) for _ in range(2)]
    crops += [torch.randn(cfg["batch"], 3, cfg["local"], cfg["local"], generator=g) for _ in range(cfg["local_crops"])]
    return [c.to(device) for c in crops]


class Timer:
    """Adds the wall time of each phase (synchronising the device around it)."""

    def __init__(self, device):
        self.device, self.times = device, dict.fromkeys(PHASES, 0.0)

    def phase(self, name):
        timer = self

        class _Ctx:
            def __enter__(self):
                sync(timer.device)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                sync(timer.device)
                timer.times[name] += time.perf_counter() - self.t0

        return _Ctx()


def official_step(parts, crops, timer: Timer) -> None:
    """The official structure: looped loss, per-tensor AdamW, loss.item() every step, each parameter's gradient
    clipped on its own (official ``clip_gradients``, as the lean step's default ``clip_grad_mode="param"``),
    Python-loop EMA, the head's last layer as ``nn.utils.weight_norm``."""
    student, teacher, loss_module, optimizer = parts
    set_schedule_values(optimizer, 1e-4, 0.04)
    with timer.phase("teacher_forward"), torch.no_grad():
        teacher_output = teacher(crops[:2])
    with timer.phase("student_forward_loss"):
        loss = looped_dino_loss(loss_module, student(crops), teacher_output, 0)
        loss.item()
    with timer.phase("backward"):
        optimizer.zero_grad()
        loss.backward()
    with timer.phase("optimizer"):
        official_clip_gradients(student.parameters(), 3.0)
        optimizer.step()
    with timer.phase("ema"), torch.no_grad():
        for param_q, param_k in zip(student.parameters(), teacher.parameters()):
            param_k.data.mul_(0.996).add_((1 - 0.996) * param_q.detach().data)


def lean_step(state: DINOState, crops, timer: Timer) -> None:
    """tinydino's step, timed as a whole (its phases are measured by :func:`lean_phases`)."""
    with timer.phase("student_forward_loss"):
        train_step(state, crops, 0, StepSchedule(1e-4, 0.04, 0.996))


def backbone_time(student, teacher, crops, device) -> float:
    """Seconds of the backbones' own work in a step: teacher forward (2 global views), student forward + backward."""
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        teacher.backbone(torch.cat(crops[:2]))
    groups = [torch.cat(crops[:2]), torch.cat(crops[2:])] if len(crops) > 2 else [torch.cat(crops[:2])]
    out = torch.cat([student.backbone(g) for g in groups])
    out.float().sum().backward()
    student.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t0


def step_flops(state: DINOState, crops) -> int:
    with FlopCounterMode(display=False) as counter:
        train_step(state, crops, 0, StepSchedule(1e-4, 0.04, 0.996))
    return counter.get_total_flops()


def matmul_peak_gflops(device: torch.device, n: int, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def lean_state_of(student, teacher, loss_module, device) -> DINOState:
    optimizer = build_optimizer("adamw", get_params_groups(student))
    return DINOState(
        student=student,
        teacher=teacher,
        student_module=student,
        loss=loss_module,
        optimizer=optimizer,
        scaler=None,
        device=device,
        clip_grad=3.0,
        clip_grad_mode="param",
        freeze_last_layer=0,
    )


def official_parts_of(student, teacher, loss_module) -> tuple:
    """The official step's parts: its head's last layer (``nn.utils.weight_norm``) and its per-tensor AdamW."""
    student, teacher = use_official_last_layer(student), use_official_last_layer(teacher)
    return student, teacher, loss_module, reference_optimizer(get_params_groups(student))


def outside_backbone_times(cfg: dict, device: torch.device, crops) -> tuple[list[float], list[float]]:
    """Step seconds of each path with both backbones replaced by :class:`CachedBackbone` (interleaved repeats)."""
    student, teacher, loss_module = build(cfg, device)
    lean_state = lean_state_of(*without_backbones(student, teacher, crops), loss_module, device)
    ref_student, ref_teacher, ref_loss = build(cfg, device)
    official = official_parts_of(*without_backbones(ref_student, ref_teacher, crops), ref_loss)
    lean_times, official_times = [], []
    for repeat in range(cfg["warmup"] + 2 * cfg["repeats"]):
        for path in ("lean", "official") if repeat % 2 == 0 else ("official", "lean"):
            timer = Timer(device)
            if path == "lean":
                lean_step(lean_state, crops, timer)
            else:
                official_step(official, crops, timer)
            if repeat >= cfg["warmup"]:
                (lean_times if path == "lean" else official_times).append(sum(timer.times.values()))
    return lean_times, official_times


def run(cfg: dict, device: torch.device, peak_size: int = 2048) -> dict:
    crops = make_crops(cfg, device)
    student, teacher, loss_module = build(cfg, device)
    lean_state = lean_state_of(student, teacher, loss_module, device)
    ref_student, ref_teacher, ref_loss = build(cfg, device)
    official = official_parts_of(ref_student, ref_teacher, ref_loss)
    images = cfg["batch"]
    for _ in range(cfg["warmup"]):
        lean_step(lean_state, crops, Timer(device))
        official_step(official, crops, Timer(device))
        backbone_time(student, teacher, crops, device)
    lean_times, official_times, backbone_times, official_phases = [], [], [], []
    for _ in range(cfg["repeats"]):  # interleaved, so that background load hits every path alike
        timer = Timer(device)
        lean_step(lean_state, crops, timer)
        lean_times.append(sum(timer.times.values()))
        timer = Timer(device)
        official_step(official, crops, timer)
        official_times.append(sum(timer.times.values()))
        official_phases.append(timer.times)
        backbone_times.append(backbone_time(student, teacher, crops, device))
    outside_lean, outside_official = outside_backbone_times(cfg, device, crops)
    flops = step_flops(lean_state, crops)
    peak = matmul_peak_gflops(device, peak_size)
    lean, off, bb = statistics.median(lean_times), statistics.median(official_times), statistics.median(backbone_times)
    return {
        "config": {
            **cfg,
            "device": str(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
        "lean_step_s": summary(lean_times),
        "official_step_s": summary(official_times),
        "backbone_fwd_bwd_s": summary(backbone_times),
        "official_phases_s": {k: statistics.median(p[k] for p in official_phases) for k in PHASES},
        "images_per_s": {"lean": images / lean, "official": images / off},
        "step_speedup": off / lean,
        "outside_backbone_s": {"lean": summary(outside_lean), "official": summary(outside_official)},
        "outside_backbone_speedup": statistics.median(outside_official) / statistics.median(outside_lean),
        "outside_backbone_derived_s": {"lean": max(lean - bb, 1e-9), "official": max(off - bb, 1e-9)},
        "outside_backbone_derived_speedup": max(off - bb, 1e-9) / max(lean - bb, 1e-9),
        "flops_per_step": flops,
        "achieved_gflops": flops / lean / 1e9,
        "matmul_peak_gflops": peak,
        "fraction_of_peak": flops / lean / 1e9 / peak,
    }


def print_table(report: dict) -> None:
    print(
        f"DINO training step, {report['config']['device']}, {report['config']['threads']} threads, "
        f"batch {report['config']['batch']}, out_dim {report['config']['out_dim']}, "
        f"host memory {report['config'].get('host_memory', 'default')}"
    )
    print(f"{'path':<10} {'step s (median)':>16} {'min':>8} {'max':>8} {'img/s':>8}")
    for path in ("lean", "official"):
        s = report[f"{path}_step_s"]
        print(f"{path:<10} {s['median']:>16.3f} {s['min']:>8.3f} {s['max']:>8.3f} {report['images_per_s'][path]:>8.1f}")
    print("official phases (s): " + ", ".join(f"{k} {v:.3f}" for k, v in report["official_phases_s"].items()))
    outside, derived = report["outside_backbone_s"], report["outside_backbone_derived_s"]
    lean_o, off_o = outside["lean"], outside["official"]
    print(
        f"outside the backbone (backbones cached): lean {lean_o['median']:.3f} s [{lean_o['min']:.3f}-"
        f"{lean_o['max']:.3f}] vs official {off_o['median']:.3f} s [{off_o['min']:.3f}-{off_o['max']:.3f}] -> "
        f"{report['outside_backbone_speedup']:.2f}x"
    )
    print(
        f"backbone fwd+bwd {report['backbone_fwd_bwd_s']['median']:.3f} s; step minus backbone: lean "
        f"{derived['lean']:.3f} s vs official {derived['official']:.3f} s -> "
        f"{report['outside_backbone_derived_speedup']:.2f}x; whole step {report['step_speedup']:.2f}x"
    )
    print(
        f"{report['flops_per_step'] / 1e9:.1f} GFLOP per step, {report['achieved_gflops']:.1f} GFLOP/s achieved, "
        f"matmul peak {report['matmul_peak_gflops']:.1f} GFLOP/s -> {100 * report['fraction_of_peak']:.0f}% of peak"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__, "path")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    add_host_memory_flag(parser, "both paths run under it")
    args = parser.parse_args(argv)
    host_memory = configure_host_memory(args.host_memory)
    cfg = preset_config(args, QUICK, FULL)
    report = run(cfg, torch.device(args.device), peak_size=512 if args.quick else 2048)
    report["config"]["host_memory"] = host_memory
    print_table(report)
    return emit_report(report, args.json)


if __name__ == "__main__":
    main()
