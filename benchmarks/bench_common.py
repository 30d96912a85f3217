"""What every benchmark script shares: the ``--host_memory`` flag, the common flags and presets, and the report's
output (a JSON file and the JSON line that ends stdout). Imported as ``benchmarks.bench_common`` (the scripts put the
repository root on ``sys.path`` first)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from utils.runtime.host_memory import HOST_MEMORY_MODES


def base_parser(doc: str, repeated: str) -> argparse.ArgumentParser:
    """A parser described by the first line of ``doc`` with ``--quick``, ``--repeats`` (timed repeats of each
    ``repeated``), ``--threads`` and ``--json``; see :func:`preset_config`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help=f"timed repeats of each {repeated}")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the JSON report to this file")
    return parser


def preset_config(args: argparse.Namespace, quick: dict, full: dict) -> dict:
    """The quick or full preset with ``--repeats`` applied; sets ``--threads`` (when given) for the process."""
    cfg = dict(quick if args.quick else full)
    if args.repeats:
        cfg["repeats"] = args.repeats
    if args.threads:
        torch.set_num_threads(args.threads)
    return cfg


def add_host_memory_flag(parser: argparse.ArgumentParser, runs_under_it: str, flag: str = "--host_memory") -> None:
    """``--host_memory retain|default`` (default retain, as CPU training runs); ``runs_under_it`` says what the
    process-wide setting applies to (e.g. "both paths run under it")."""
    parser.add_argument(
        flag,
        choices=HOST_MEMORY_MODES,
        default="retain",
        help="retain: freed host memory kept for reuse, as CPU training does (utils/runtime/host_memory.py); default: "
        f"glibc's own behaviour. Process-wide: {runs_under_it}",
    )


def emit_report(report: dict, json_path: str | Path | None) -> dict:
    """Write ``report`` to ``json_path`` (when given) and print it as the last line of stdout; returns it."""
    if json_path is not None:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return report
