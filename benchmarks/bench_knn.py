"""Benchmark tinydino's k-NN (utils/eval/knn.py) against scikit-learn's brute-force ``KNeighborsClassifier``.

Same random fp32 features for everyone; task: uniform-vote Euclidean k-NN predictions of the whole test set
(the mode in which both compute the same thing). Reports, per method, wall time over several repeats (median,
min, max; repeats interleaved so background load hits all methods alike) and the peak extra memory of one run,
measured in a fresh child process as the peak RSS after the run minus the RSS once the features exist (see
:func:`peak_rss_bytes` for why this is VmHWM and not ``ru_maxrss`` on Linux).
scikit-learn's time includes ``fit`` (for ``algorithm="brute"`` it only validates and stores the training set).

    python benchmarks/bench_knn.py                      # 100 000 x 192 train, 10 000 test, k=20, 10 classes
    python benchmarks/bench_knn.py --quick --json out.json

The last line of stdout is the JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.neighbors import KNeighborsClassifier

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_common import emit_report  # noqa: E402
from utils.eval.knn import knn_predict  # noqa: E402

METHODS = ("tinydino", "sklearn_brute_n_jobs1", "sklearn_brute_default")
OURS = METHODS[0]
SPEEDUP_KEYS = ("speedup_vs_sklearn", "speedup_vs_sklearn_best_of", "speedup_vs_sklearn_cpu_time")
MIN_SPEEDUP = 1.5  # on the median wall time
MAX_MEMORY_FRACTION = 0.10
FULL = {"n_train": 100_000, "n_test": 10_000, "dim": 192, "k": 20, "num_classes": 10, "repeats": 3}
QUICK = {"n_train": 2_000, "n_test": 300, "dim": 32, "k": 20, "num_classes": 10, "repeats": 2}


def make_data(cfg: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 train ``(N, D)``, int64 train labels ``(N,)``, fp32 test ``(M, D)``, allocated without temporaries."""
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(cfg["n_train"], cfg["dim"], generator=g)
    labels = torch.randint(0, cfg["num_classes"], (cfg["n_train"],), generator=g)
    test = torch.randn(cfg["n_test"], cfg["dim"], generator=g)
    return train, labels, test


def predict(method: str, train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor, cfg: dict) -> np.ndarray:
    """Predicted labels ``(M,)`` of one method (numpy arrays share memory with the tensors: no copies)."""
    if method == OURS:
        options = {"metric": "euclidean", "weighting": "uniform"}
        predictions, _ = knn_predict(train, labels, test, cfg["k"], cfg["num_classes"], **options)
        return predictions.numpy()
    n_jobs = 1 if method == "sklearn_brute_n_jobs1" else None
    clf = KNeighborsClassifier(n_neighbors=cfg["k"], metric="euclidean", algorithm="brute", n_jobs=n_jobs)
    return clf.fit(train.numpy(), labels.numpy()).predict(test.numpy())


def time_methods(cfg: dict, seed: int) -> tuple[dict[str, dict[str, list[float]]], dict[str, np.ndarray]]:
    """Wall and CPU times (one warm-up, then ``repeats`` interleaved runs) and the predictions of each method.

    CPU time (all threads of this process) is reported too: on a shared machine it is far less sensitive than
    wall time to other processes competing for the cores.
    """
    train, labels, test = make_data(cfg, seed)
    outputs = {m: predict(m, train, labels, test, cfg) for m in METHODS}  # warm-up
    times: dict[str, dict[str, list[float]]] = {m: {"wall": [], "cpu": []} for m in METHODS}
    for _ in range(cfg["repeats"]):
        for method in METHODS:
            wall, cpu = time.perf_counter(), time.process_time()
            predict(method, train, labels, test, cfg)
            times[method]["cpu"].append(time.process_time() - cpu)
            times[method]["wall"].append(time.perf_counter() - wall)
    return times, outputs


def peak_rss_bytes() -> int:
    """Peak resident set size of this process, in bytes.

    Linux: ``VmHWM`` of /proc/self/status. Not ``ru_maxrss``: on Linux a child started by fork + exec inherits the
    parent's peak in ``ru_maxrss`` (the old address space's high-water mark is folded in at exec), so a child of a
    big parent would read the parent's peak and report zero extra memory. Elsewhere ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux/BSD


def reset_peak_rss() -> None:
    """Lower the recorded peak RSS to the current RSS (Linux >= 4.0), so earlier transients (imports, data
    generation) cannot hide the peak of the measured run; a no-op where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def child_peak_memory(method: str, cfg: dict, seed: int) -> None:
    """(Child process) print the peak extra memory, in bytes, of one run of ``method``."""
    train, labels, test = make_data(cfg, seed)
    small = {**cfg, "k": min(cfg["k"], 50)}
    predict(method, train[:100], labels[:100], test[:4], small)  # load libraries, start thread pools
    reset_peak_rss()
    base = peak_rss_bytes()
    predict(method, train, labels, test, cfg)
    print(json.dumps({"peak_extra_bytes": peak_rss_bytes() - base}))


def measure_memory(method: str, cfg: dict, seed: int) -> int:
    """Run :func:`child_peak_memory` in a fresh interpreter so every figure is independent."""
    args = [sys.executable, str(Path(__file__).resolve()), "--child-memory", method, "--seed", str(seed)]
    for key in ("n_train", "n_test", "dim", "k", "num_classes"):
        args += [f"--{key.replace('_', '-')}", str(cfg[key])]
    proc = subprocess.run(args, capture_output=True, text=True, check=True)
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"])


def summarise(cfg: dict, times: dict, outputs: dict, memory: dict) -> dict:
    """The JSON report."""
    full_bytes = cfg["n_train"] * cfg["n_test"] * 4
    results = {
        m: {
            "times_s": times[m]["wall"],
            "median_s": statistics.median(times[m]["wall"]),
            "min_s": min(times[m]["wall"]),
            "max_s": max(times[m]["wall"]),
            "cpu_times_s": times[m]["cpu"],
            "median_cpu_s": statistics.median(times[m]["cpu"]),
            "peak_extra_bytes": memory[m],
            "peak_extra_fraction_of_full_matrix": memory[m] / full_bytes,
        }
        for m in METHODS
    }
    others = [m for m in METHODS if m != OURS]
    speedup = {m: results[m]["median_s"] / results[OURS]["median_s"] for m in others}
    mismatches = {m: int((outputs[m] != outputs[OURS]).sum()) for m in METHODS if m != OURS}
    return {
        "config": {
            **cfg,
            "dtype": "float32",
            "task": "uniform-vote euclidean k-NN predictions",
            "torch": torch.__version__,
            "sklearn": sklearn.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
        },
        "results": results,
        "speedup_vs_sklearn": speedup,
        "speedup_vs_sklearn_best_of": {m: results[m]["min_s"] / results[OURS]["min_s"] for m in others},
        "speedup_vs_sklearn_cpu_time": {m: results[m]["median_cpu_s"] / results[OURS]["median_cpu_s"] for m in others},
        "full_similarity_bytes": full_bytes,
        "prediction_mismatches": mismatches,
        "predictions_match_sklearn": not any(mismatches.values()),
        "targets": {
            "min_speedup": MIN_SPEEDUP,
            "max_memory_fraction": MAX_MEMORY_FRACTION,
            "speedup_met": min(speedup.values()) >= MIN_SPEEDUP,
            "memory_met": results[OURS]["peak_extra_fraction_of_full_matrix"] <= MAX_MEMORY_FRACTION,
        },
    }


def format_table(report: dict) -> str:
    """Human-readable summary."""
    cfg = report["config"]
    lines = [
        f"k-NN benchmark: {cfg['n_train']} train x {cfg['dim']} dims, {cfg['n_test']} test, k={cfg['k']}, "
        f"{cfg['num_classes']} classes, {cfg['repeats']} repeats, {cfg['torch_threads']} torch threads, "
        f"{cfg['cpu_count']} CPUs",
        f"{'method':<24}{'median s':>10}{'min s':>9}{'max s':>9}{'cpu s':>8}{'peak MiB':>10}{'% full':>8}"
        f"{'sk/ours':>9}{'best-of':>9}{'cpu':>7}",
    ]
    for method, r in report["results"].items():
        ratios = [report[key].get(method, 1.0) for key in SPEEDUP_KEYS]
        lines.append(
            f"{method:<24}{r['median_s']:>10.3f}{r['min_s']:>9.3f}{r['max_s']:>9.3f}{r['median_cpu_s']:>8.2f}"
            f"{r['peak_extra_bytes'] / 2**20:>10.1f}{100 * r['peak_extra_fraction_of_full_matrix']:>7.2f}%"
            f"{ratios[0]:>9.2f}{ratios[1]:>9.2f}{ratios[2]:>7.2f}"
        )
    targets = report["targets"]
    lines.append(
        f"full similarity matrix: {report['full_similarity_bytes'] / 2**20:.0f} MiB; predictions match sklearn: "
        f"{report['predictions_match_sklearn']} {report['prediction_mismatches']}; "
        f"speedup >= {targets['min_speedup']}: {targets['speedup_met']}; "
        f"memory <= {100 * targets['max_memory_fraction']:.0f}%: {targets['memory_met']}"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds), for the test suite")
    for key, value in FULL.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"default {value}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON report here")
    parser.add_argument("--child-memory", choices=METHODS, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    defaults = QUICK if args.quick else FULL
    cfg = {key: value if getattr(args, key) is None else getattr(args, key) for key, value in defaults.items()}
    if args.child_memory:
        child_peak_memory(args.child_memory, cfg, args.seed)
        return None
    times, outputs = time_methods(cfg, args.seed)
    memory = {m: measure_memory(m, cfg, args.seed) for m in METHODS}
    report = summarise(cfg, times, outputs, memory)
    print(format_table(report))
    return emit_report(report, args.json)


if __name__ == "__main__":
    main()
