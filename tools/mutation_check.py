"""Mutation check: small changes of DINO's meaning, each applied to a temporary copy of the repository, must each make
a fast test fail.

Every mutant names a library file, an exact source fragment that occurs there once, and its replacement. For each
mutant the working tree's files (without ``.git``, ``.venv``, caches, ``runs/`` and ``data/``) are copied to a
temporary folder (the working tree itself is never modified), the fragment is replaced there, and the mutant's own
test selection runs in that copy (``--all-tests``: the whole fast suite). A mutant is

* ``killed`` when a test fails (the first failing test is reported),
* ``survived`` when every test passes,
* ``error`` when its fragment is not found exactly once (the code moved: fix the pattern), when its tests do not
  collect, or when they fail on the unmutated copy too (a baseline run checks the selections first).

Usage::

    python tools/mutation_check.py                # every mutant against its own tests
    python tools/mutation_check.py --ci           # the fixed subset CI runs
    python tools/mutation_check.py --only NAME... # some mutants
    python tools/mutation_check.py --list         # the mutants and their tests
    python tools/mutation_check.py --all-tests    # each mutant against the whole fast suite (slow)

Prints a table and, last, one JSON line ``{"killed": n, "survived": n, "error": n, "results": [...]}``. Exits 1 when a
mutant survives or errors, 0 when every mutant is killed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST_MARKERS = "not slow and not slurm and not distributed"

# The mutant table lives beside this file (imported by path, so the check also runs as ``python tools/...``).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutants import MUTANTS, Mutant  # noqa: E402


@dataclass
class Result:
    name: str
    file: str
    status: str  # killed | survived | error
    killer: str = ""  # the first failing test, or why the mutant is an error
    seconds: float = 0.0
    tests: list[str] = field(default_factory=list)


#: Folders never copied: git's, the virtual environment, caches, and the top level's run outputs and datasets.
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}
SKIP_TOP_DIRS = {"runs", "data"}
SKIP_SUFFIXES = (".pyc", ".nbi", ".nbc")  # bytecode and Numba caches (tied to the original paths)


def repository_files(root: Path) -> list[str]:
    """The working tree's files, as they are now (new files of any helper too), without git's folder, the virtual
    environment, caches and the top level's ``runs/`` and ``data/``. (git's ignore rules would drop ``utils/data/``'s
    new files: ``.gitignore`` ignores every ``data/`` folder.)"""
    files = []
    for folder, dirs, names in os.walk(root):
        rel = Path(folder).relative_to(root)
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not (rel == Path(".") and d in SKIP_TOP_DIRS))
        files += [str(rel / name) for name in names if not name.endswith(SKIP_SUFFIXES)]
    return sorted(files)


def copy_tree(root: Path, files: list[str], dest: Path) -> None:
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)


def apply_mutant(copy: Path, mutant: Mutant) -> str | None:
    """Replace the mutant's pattern in the copy; returns why it could not (None when applied)."""
    path = copy / mutant.file
    if not path.is_file():
        return f"file {mutant.file} not found"
    source = path.read_text(encoding="utf-8")
    count = source.count(mutant.pattern)
    if count != 1:
        return f"pattern found {count} times in {mutant.file} (must be exactly once)"
    path.write_text(source.replace(mutant.pattern, mutant.replacement), encoding="utf-8")
    return None


FAILED_LINE = re.compile(r"^(FAILED|ERROR) (\S+)")


def failing_tests(output: str) -> list[str]:
    """Node ids of the ``FAILED``/``ERROR`` lines of pytest's short summary (``-rfE``)."""
    return [m.group(2) for line in output.splitlines() if (m := FAILED_LINE.match(line.strip()))]


def error_summary(output: str, failed: list[str]) -> str:
    """The first ``E   ...`` line of pytest's output (what went wrong), else the last line."""
    errors = [line[1:].strip() for line in output.splitlines() if line.startswith("E   ")]
    where = f"{failed[0]}: " if failed else ""
    lines = output.strip().splitlines()
    return where + (errors[0] if errors else lines[-1] if lines else "no output")[:200]


#: Imported once by the checker before it forks a child per mutant, so that no child imports them again (seconds each
#: on a busy CPU). None of the project's own modules: each child imports those from its own copy.
PRELOAD = (
    "numpy",
    "PIL.Image",
    "torch",
    "torchvision",
    "timm",
    "sklearn.neighbors",
    "scipy.stats",
    "numba",
    "matplotlib.figure",
    "huggingface_hub",
    "torch.utils.tensorboard",
    "pytest",
)
PROJECT_MODULES = {"utils", "tests", "tools", "benchmarks", "main_dino", "eval_knn", "eval_linear", "eval_stl10"}


def preload() -> None:
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def pytest_in_process_is_safe() -> bool:
    """A forked child can run pytest in-process only when none of the project's modules is loaded here (a child would
    test those instead of its copy's): not so when the checker itself runs inside the test suite."""
    return not any(name.split(".")[0] in PROJECT_MODULES for name in sys.modules)


#: Faster pytest start and end for a pass/fail answer: no assertion rewriting (a failing assert still fails), no
#: unraisable-exception plugin (its end-of-session garbage collections), no anyio plugin (an entry point).
LEAN_PYTEST = ("--assert=plain", "-p", "no:unraisableexception", "-p", "no:anyio")


def pytest_args(tests: list[str], stop_first: bool, deselect: list[str]) -> list[str]:
    args = ["-q", "-p", "no:cacheprovider", "-rfE", "-m", FAST_MARKERS, *LEAN_PYTEST]
    args += ["-x"] if stop_first else []
    args += [arg for node in deselect for arg in ("--deselect", node)]
    return args + tests


def run_pytest(copy: Path, args: list[str], log: Path, in_process: bool) -> int:
    """pytest ``args`` in ``copy`` (its own ``utils`` first on the path), output to ``log``; returns the exit code.
    ``in_process``: in this (forked) process, which then belongs to the copy; else in a subprocess."""
    env = {"PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    if not in_process:
        with open(log, "w") as out:
            cmd = [sys.executable, "-m", "pytest", *args]
            return subprocess.run(
                cmd, cwd=copy, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
            ).returncode
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    os.chdir(copy)
    sys.path.insert(0, str(copy))
    sys.dont_write_bytecode = True
    import pytest

    return int(pytest.main(args))


def test_selection(mutant: Mutant, all_tests: bool) -> list[str]:
    return ["tests"] if all_tests else list(mutant.tests)


def mutant_work(mutant: Mutant, copy: Path, files: list[str], options: argparse.Namespace, deselect: list[str]):
    """Runs in a child process: copy, mutate, test; returns ``{"status", "killer"}``."""
    if not mutant.tests and not options.all_tests:  # pytest would run the whole suite
        return {"status": "error", "killer": "no tests listed for this mutant"}
    copy_tree(ROOT, files, copy)
    problem = apply_mutant(copy, mutant)
    if problem is not None:
        return {"status": "error", "killer": problem}
    log = copy / "mutant-pytest.log"
    args = pytest_args(test_selection(mutant, options.all_tests), True, deselect)
    code = run_pytest(copy, args, log, options.in_process)
    output = log.read_text(errors="replace")
    failed = failing_tests(output)
    if code == 0:
        status, killer = "survived", ""
    elif code == 1 and failed:
        status, killer = "killed", failed[0]
    elif code == 5:
        status, killer = "error", "no test collected (check the test selection)"
    else:
        status, killer = "error", f"pytest exit {code}: {error_summary(output, failed)}"
    if options.keep_logs and status != "killed":
        (ROOT.parent / f"mutant-{mutant.name}.log").write_text(output)
    return {"status": status, "killer": killer}


def baseline_work(copy: Path, files: list[str], tests: list[str], options: argparse.Namespace):
    """Runs in a child process: the selections on the unmutated copy; returns ``{"code", "failed", "tail"}``."""
    copy_tree(ROOT, files, copy)
    log = copy / "baseline-pytest.log"
    code = run_pytest(copy, pytest_args(tests, False, []), log, options.in_process)
    output = log.read_text(errors="replace")
    return {"code": code, "failed": failing_tests(output), "tail": output[-3000:]}


def run_forked(jobs: list[tuple[str, object]], parallel: int, timeout: float, on_done) -> None:
    """Run each ``(key, work)`` in a forked child (its own process group and temporary folder), ``parallel`` at a
    time; ``work(folder)`` returns a JSON-able dict. ``on_done(key, result, seconds)`` gets it, or ``None`` when the
    child was killed at ``timeout`` seconds or died without a result. Single-threaded: forking is safe."""
    pending, running = list(jobs), {}
    while pending or running:
        while pending and len(running) < max(1, parallel):
            key, work = pending.pop(0)
            folder = Path(tempfile.mkdtemp(prefix=f"mutant-{key}-"))
            result_file = Path(tempfile.mkstemp(prefix=f"mutant-{key}-", suffix=".json")[1])
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the child
                os.setpgid(0, 0)
                try:
                    payload = work(folder)
                except BaseException as exc:  # noqa: BLE001 - reported as the mutant's error
                    payload = {"status": "error", "killer": f"checker error: {exc!r}"[:300], "code": -2}
                result_file.write_text(json.dumps(payload))
                os._exit(0)
            running[pid] = (key, time.monotonic(), folder, result_file)
        pid, _ = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for child, (_, start, _, _) in running.items():
                if time.monotonic() - start > timeout:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child, signal.SIGKILL)
            time.sleep(0.2)
            continue
        if pid not in running:
            continue
        key, start, folder, result_file = running.pop(pid)
        text = result_file.read_text() if result_file.is_file() else ""
        result_file.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        on_done(key, json.loads(text) if text else None, time.monotonic() - start)


def print_table(results: list[Result]) -> None:
    rows = [("mutant", "file", "result", "killing test / reason", "s")]
    rows += [(r.name, r.file, r.status, r.killer, f"{r.seconds:.0f}") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="check only these mutants")
    parser.add_argument("--ci", action="store_true", help="check only the fixed CI subset")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, then exit")
    parser.add_argument("--all-tests", action="store_true", help=f"run the whole suite -m '{FAST_MARKERS}'")
    parser.add_argument("--jobs", type=int, default=1, help="mutants checked in parallel (default 1)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant before it counts as a hang")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the selections on unmutated code")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--keep-logs", action="store_true", help="write pytest's output of unkilled mutants next to")
    return parser.parse_args(argv)


def select(args: argparse.Namespace, mutants: tuple[Mutant, ...] = MUTANTS) -> list[Mutant]:
    chosen = [m for m in mutants if m.ci] if args.ci else list(mutants)
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in mutants})
        if unknown:
            raise SystemExit(f"unknown mutant(s): {', '.join(unknown)} (see --list)")
        chosen = [m for m in chosen if m.name in args.only]
    return chosen


def main(argv: list[str] | None = None, mutants: tuple[Mutant, ...] = MUTANTS) -> int:
    args = parse_args(argv)
    chosen = select(args, mutants)
    if args.list:
        for m in chosen:
            print(f"{m.name}{'  [ci]' if m.ci else ''}\n  {m.file}: {m.pattern!r} -> {m.replacement!r}")
            print("  tests: " + " ".join(m.tests))
        return 0
    files = repository_files(ROOT)
    args.in_process = pytest_in_process_is_safe()
    if args.in_process:
        preload()
    deselect: list[str] = []
    if not args.no_baseline:
        tests = sorted({t for m in chosen for t in test_selection(m, args.all_tests)})
        found = {}
        run_forked(
            [("baseline", lambda folder: baseline_work(folder, files, tests, args))],
            1,
            2 * args.timeout,
            lambda key, result, seconds: found.update(result or {"code": -1, "failed": [], "tail": "timeout"}),
        )
        if found["code"] not in (0, 1):
            print(found["tail"], file=sys.stderr)
            print("baseline: the selected tests do not run on the unmutated copy", file=sys.stderr)
            return 2
        if found["failed"]:
            print(f"baseline: {len(found['failed'])} test(s) fail without any mutant, left out: {found['failed']}")
            deselect = found["failed"]
    by_name = {m.name: m for m in chosen}
    done: dict[str, Result] = {}

    def record(name: str, outcome: dict | None, seconds: float) -> None:
        m = by_name[name]
        if outcome is None:
            outcome = {"status": "killed", "killer": f"timeout after {args.timeout:.0f} s (a hang)"}
        r = Result(m.name, m.file, outcome["status"], outcome["killer"], round(seconds, 1))
        r.tests = test_selection(m, args.all_tests)
        done[name] = r
        print(f"{r.status:8s} {r.name} ({r.seconds:.0f} s) {r.killer}", flush=True)

    jobs = [(m.name, lambda folder, m=m: mutant_work(m, folder, files, args, deselect)) for m in chosen]
    run_forked(jobs, args.jobs, args.timeout, record)
    results = [done[m.name] for m in chosen]
    print()
    print_table(results)
    counts = {s: sum(r.status == s for r in results) for s in ("killed", "survived", "error")}
    summary = {**counts, "baseline_failures": deselect, "results": [asdict(r) for r in results]}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0 if counts["killed"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
