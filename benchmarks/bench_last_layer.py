"""Benchmark the DINO head's weight-normalised last layer: tinydino's fused layer vs the official DINO layer.

Per training step the last layer runs forward and backward on the student's outputs (``2 + n`` views) and forward on
the teacher's (2 views). Three implementations of the same layer, same weights, same inputs:

(a) ``fused``: :class:`utils.model.vit.WeightNormLinear` (``utils/model/weight_norm.py``: output-side normalisation,
    blocks
    of rows in the L2 cache; the CPU path);
(b) ``official``: ``nn.utils.weight_norm(nn.Linear(..., bias=False))``, as official DINO builds it;
(c) ``composed``: ``F.linear(x, g * V / ||V||)`` written plainly, as autograd composes it.

Repeats are interleaved (the order rotates); the report gives the median, min and max seconds of (student forward +
backward, teacher forward) per implementation and the ratios to ``fused``.

    python benchmarks/bench_last_layer.py                   # out_dim 65536, bottleneck 256, 128 + 64 rows
    python benchmarks/bench_last_layer.py --quick --json out.json

The last line of stdout is the JSON report.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_common import add_host_memory_flag, base_parser, emit_report, preset_config  # noqa: E402
from benchmarks.reference_step import official_last_layer  # noqa: E402
from utils.model.vit import WeightNormLinear  # noqa: E402
from utils.runtime.host_memory import configure_host_memory  # noqa: E402

IMPLEMENTATIONS = ("fused", "official", "composed")
FULL = {"out_dim": 65536, "bottleneck": 256, "student_rows": 128, "teacher_rows": 64, "repeats": 9, "warmup": 2}
QUICK = {"out_dim": 512, "bottleneck": 32, "student_rows": 8, "teacher_rows": 4, "repeats": 2, "warmup": 1}


def composed_forward(layer: WeightNormLinear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.weight_v * (layer.weight_g / layer.weight_v.norm(dim=1, keepdim=True)))


def build(cfg: dict) -> dict:
    """The three student layers (same weights) and their teachers, plus the inputs and the upstream gradient."""
    torch.manual_seed(0)
    student = WeightNormLinear(cfg["bottleneck"], cfg["out_dim"])
    teacher = WeightNormLinear(cfg["bottleneck"], cfg["out_dim"]).requires_grad_(False)
    official, official_teacher = official_last_layer(student), official_last_layer(teacher)
    x = F.normalize(torch.randn(cfg["student_rows"], cfg["bottleneck"]), dim=-1)
    return {
        "layers": {
            "fused": (student, teacher),
            "official": (official, official_teacher),
            "composed": (student, teacher),
        },
        "x": x,
        "x_teacher": F.normalize(torch.randn(cfg["teacher_rows"], cfg["bottleneck"]), dim=-1),
        "grad": torch.randn(cfg["student_rows"], cfg["out_dim"]) / cfg["out_dim"],
    }


def one_step(name: str, parts: dict) -> float:
    """Seconds of one student forward + backward and one teacher forward with implementation ``name``."""
    student, teacher = parts["layers"][name]
    forward = composed_forward if name == "composed" else (lambda layer, x: layer(x))
    x = parts["x"].clone().requires_grad_()
    start = time.perf_counter()
    with torch.no_grad():
        forward(teacher, parts["x_teacher"])
    forward(student, x).backward(parts["grad"])
    elapsed = time.perf_counter() - start
    student.zero_grad(set_to_none=True)
    return elapsed


def run(cfg: dict) -> dict:
    parts = build(cfg)
    times: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    for repeat in range(cfg["warmup"] + cfg["repeats"]):
        shift = repeat % len(IMPLEMENTATIONS)
        for name in IMPLEMENTATIONS[shift:] + IMPLEMENTATIONS[:shift]:
            elapsed = one_step(name, parts)
            if repeat >= cfg["warmup"]:
                times[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in times.items()}
    machine = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()}
    return {
        "config": {**cfg, **machine},
        "seconds": {
            name: {"median": medians[name], "min": min(v), "max": max(v), "all": v} for name, v in times.items()
        },
        "speedup_vs_fused": {name: medians[name] / medians["fused"] for name in IMPLEMENTATIONS},
    }


def print_table(report: dict) -> None:
    cfg = report["config"]
    print(
        f"DINO head last layer, out_dim {cfg['out_dim']}, bottleneck {cfg['bottleneck']}: student "
        f"{cfg['student_rows']} rows forward + backward, teacher {cfg['teacher_rows']} rows forward, "
        f"{cfg['threads']} threads, host memory {cfg.get('host_memory', 'default')}"
    )
    print(f"{'layer':<10} {'ms (median)':>12} {'min':>8} {'max':>8} {'fused is':>10}")
    for name in IMPLEMENTATIONS:
        s = report["seconds"][name]
        print(
            f"{name:<10} {1e3 * s['median']:>12.1f} {1e3 * s['min']:>8.1f} {1e3 * s['max']:>8.1f} "
            f"{report['speedup_vs_fused'][name]:>9.2f}x"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__, "implementation")
    add_host_memory_flag(parser, "every implementation runs under it")
    args = parser.parse_args(argv)
    host_memory = configure_host_memory(args.host_memory)
    cfg = preset_config(args, QUICK, FULL)
    report = run(cfg)
    report["config"]["host_memory"] = host_memory
    print_table(report)
    return emit_report(report, args.json)


if __name__ == "__main__":
    main()
