"""The scripts as submitit jobs (SLURM or the local executor): the job object, preemption and requeue, waiting.

``run_with_submitit.py`` holds the table of scripts a job can run (a :class:`ScriptEntry` each: the script's
``main(args)``, its parser and its flag checks), parses its own flags and submits a :class:`ScriptJob`; each task of
the job runs the script's ``main`` on the parsed flags, in-process.

Preemption and time limits: SLURM sends ``SIGUSR2`` (submitit's preemption signal, ``--signal=USR2@<delay>``) to
every task. During pretraining ``utils.runtime.signals.StopRequest`` owns that signal: every rank finishes its step,
rank 0 saves ``checkpoint.pth`` and the pretraining returns a record with ``stop_signal``. Our handlers are gone by then
and submitit's are back, so rank 0 sends the signal to itself again: submitit calls :meth:`ScriptJob.checkpoint`, writes
the returned submission and runs ``scontrol requeue``. The requeued job runs the same command, which resumes from
``--output_dir``. A signal that arrives outside the training loop goes straight to submitit (requeue at once; the
rerun resumes from the last checkpoint). The evaluation scripts are rerun from the start (``eval_linear`` resumes
from its own per-epoch checkpoint).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import submitit
from submitit.core.utils import DelayedSubmission, pickle_load

from utils.runtime.distributed import slurm_port
from utils.runtime.errors import UsageError
from utils.runtime.monitoring import log

#: The repository root (where the scripts live): put on the jobs' ``PYTHONPATH``.
REPO_ROOT = Path(__file__).resolve().parents[2]

#: After a stop by a signal that is not the preemption one (e.g. SIGTERM, which submitit's own test helper sends
#: just before SIGUSR2), rank 0 waits this long for the preemption signal before it exits without a result.
PREEMPT_WAIT_S = 5.0


@dataclass(frozen=True)
class ScriptEntry:
    """A script a job can run: ``main(args)`` runs its whole body on parsed flags (and returns its result),
    ``get_args_parser()`` builds its parser, ``validate_args(args)`` (optional) checks the flags as the script does.
    Functions, so that a job pickles them by reference and its tasks import the script by its name."""

    name: str
    main: Callable[[argparse.Namespace], Any]
    get_args_parser: Callable[[], argparse.ArgumentParser]
    validate_args: Callable[[argparse.Namespace], None] | None = None

    @classmethod
    def of(cls, module: ModuleType) -> ScriptEntry:
        """The entry of a script module that exposes ``main(args)``, ``get_args_parser()`` and, optionally,
        ``validate_args(args)``."""
        name = module.__name__.rsplit(".", 1)[-1]
        return cls(name, module.main, module.get_args_parser, getattr(module, "validate_args", None))

    def parser(self) -> argparse.ArgumentParser:
        """The script's own parser, whose errors raise :class:`UsageError` (one line) instead of exiting."""
        parser = self.get_args_parser()
        name = self.name

        def error(message: str):
            raise UsageError(f"{name}.py: {message}")

        parser.error = error  # type: ignore[method-assign]
        return parser

    def parse(self, argv: list[str]) -> argparse.Namespace:
        """The script's flags, parsed and validated exactly as the script does it."""
        args = self.parser().parse_args(argv)
        if self.validate_args is not None:
            self.validate_args(args)
        return args


def preemption_signal() -> signal.Signals:
    """The signal on which submitit checkpoints and requeues (``SIGUSR2`` unless ``SUBMITIT_PREEMPT_SIGNAL``)."""
    return signal.Signals(submitit.JobEnvironment._usr_sig())


def job_log(message: str) -> None:
    """A line in the task's error log, on every rank (the job's own bookkeeping, not the script's output)."""
    log(f"[submitit job] {message}", all_ranks=True, file=sys.stderr)


class ScriptJob(submitit.helpers.Checkpointable):
    """One task of a job: runs ``entry`` with ``argv`` in this process; requeued (same flags) on preemption."""

    def __init__(self, entry: ScriptEntry, argv: list[str]):
        self.entry = entry
        self.script = entry.name
        self.argv = list(argv)

    def __call__(self) -> Any:
        env = submitit.JobEnvironment()
        forget_stale_result(env)
        export_rendezvous(env)
        args = self.entry.parse(self.argv)
        job_log(f"{env}: running {self.script}.py {' '.join(self.argv)}")
        result = self.entry.main(args)
        stop = result.get("stop_signal") if isinstance(result, dict) else None
        if stop:
            self.stopped(stop, env, getattr(args, "output_dir", "."))
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Called by submitit (rank 0) on preemption or time-out: resubmit the same command, which resumes."""
        job_log(f"requeueing {self.script}: the next run resumes from its output folder")
        return DelayedSubmission(self, *args, **kwargs)

    def stopped(self, stop: str, env: submitit.JobEnvironment, output_dir: str) -> None:
        """The script saved a checkpoint and returned because of ``stop`` (a signal name): hand over to submitit.

        Never returns: a stopped run has no result. Rank 0 requeues (through submitit) or exits with a message;
        the other ranks exit quietly (with status 0, so that ``srun --kill-on-bad-exit`` leaves rank 0 alone)."""
        sig = preemption_signal()
        if env.global_rank != 0:
            job_log(f"rank {env.global_rank} stopped by {stop}; rank 0 requeues the job")
            sys.exit(0)
        if stop == sig.name:
            job_log(f"stopped by {stop} with a checkpoint in {output_dir}: asking submitit to requeue")
            os.kill(os.getpid(), sig)  # submitit's handler is back: it checkpoints, requeues and exits
        # A SIGTERM (scancel, or SLURM preempting in REQUEUE mode) may be followed by submitit's preemption signal.
        deadline = time.monotonic() + PREEMPT_WAIT_S
        while time.monotonic() < deadline:
            time.sleep(0.1)
        sys.exit(
            f"{self.script} stopped by {stop} after saving a checkpoint in {output_dir}; no requeue by submitit "
            "(a job that SLURM requeues resumes by itself; otherwise submit the same command again to resume)"
        )


def forget_stale_result(env: submitit.JobEnvironment) -> None:
    """A requeued task must not leave a previous run's result file in place while it runs again."""
    env.paths.result_pickle.unlink(missing_ok=True)


def export_rendezvous(env: submitit.JobEnvironment) -> None:
    """The torchrun-style rendezvous variables for the tasks of a multi-task local job (SLURM jobs need nothing:
    ``utils.runtime.distributed`` reads SLURM's own variables)."""
    if env.cluster != "local" or env.num_tasks <= 1:
        return
    os.environ.update(
        RANK=str(env.global_rank),
        WORLD_SIZE=str(env.num_tasks),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.num_tasks),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(slurm_port(env.job_id)),
    )


def wait_for_job(
    job: submitit.Job, poll_s: float = 1.0, refresh_s: float = 10.0, timeout_s: float | None = None
) -> Any:
    """The result of task 0 once every task has finished; the first failure as soon as any task reports one.

    Raises submitit's ``FailedJobError`` (with the task's traceback) for an exception in a task, and
    ``UncompletedJobError`` (with the log's tail) when the job ended without a result (cancelled, killed, node
    failure). The SLURM state is refreshed every ``refresh_s`` seconds, so such an end is noticed promptly.
    ``TimeoutError`` after ``timeout_s`` seconds (default: no limit). A requeued job is waited for to its end."""
    tasks = [job.task(i) for i in range(job.num_tasks)]
    slurm = isinstance(job, submitit.SlurmJob)
    succeeded: set[int] = set()
    start = last_refresh = time.monotonic()
    while True:
        for rank, task in enumerate(tasks):
            if rank not in succeeded and task.paths.result_pickle.exists():
                if pickle_load(task.paths.result_pickle)[0] == "error":
                    raise task.exception()
                succeeded.add(rank)
        if job.done():
            return job.results()[0]
        if slurm and time.monotonic() - last_refresh > refresh_s:
            job.watcher.update()
            last_refresh = time.monotonic()
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"job {job.job_id} has not finished after {timeout_s:.0f} s (state: {job.state})")
        time.sleep(poll_s)


def failure_reason(exc: BaseException) -> str:
    """The one line that says why a job failed, from submitit's error (the last line of the task's traceback, or
    of its error log)."""
    boilerplate = ("You can check full logs", "or at paths", "  - ", "-----")
    lines = [line for line in str(exc).splitlines() if line.strip() and not line.startswith(boilerplate)]
    return lines[-1].strip() if lines else type(exc).__name__
