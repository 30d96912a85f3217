"""Submit a tinydino script to SLURM (or run it with submitit's local executor), preemption-safe.

    python run_with_submitit.py --nodes 2 --ngpus 8 --partition gpu --timeout 2880 \\
        --arch vit_small --data_path /datasets/tiny-imagenet-200 --output_dir /checkpoint/$USER/dino_vits16
    python run_with_submitit.py --ngpus 0 --tasks_per_node 2 --cpus_per_task 4 --dataset synthetic ...  # CPU job
    python run_with_submitit.py --script eval_knn --pretrained_weights /checkpoint/$USER/dino_vits16/checkpoint.pth
    python run_with_submitit.py --local --ngpus 0 --dataset synthetic --output_dir runs/local   # no SLURM here

The launcher's own flags are listed below; every other flag (or everything after ``--``) goes to the script, and is
checked with the script's own parser before anything is submitted. One task per GPU (``--ngpus`` per node); with
``--ngpus 0`` the job requests no GPU and runs ``--tasks_per_node`` CPU tasks per node (gloo). The tasks find each
other through SLURM's variables. On preemption or near the time limit SLURM sends SIGUSR2: pretraining finishes its
step, saves ``checkpoint.pth`` and the job is requeued; the requeued job resumes from ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import eval_knn
import eval_linear
import eval_stl10
import main_dino
from utils.runtime.cli import user_errors
from utils.runtime.errors import UsageError
from utils.runtime.slurm import REPO_ROOT, ScriptEntry, ScriptJob, failure_reason, wait_for_job

PROG = "run_with_submitit.py"

#: The scripts a job can run, by the name ``--script`` takes.
SCRIPTS: dict[str, ScriptEntry] = {
    module.__name__: ScriptEntry.of(module) for module in (main_dino, eval_knn, eval_linear, eval_stl10)
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        PROG,
        usage=f"{PROG} [launcher flags] [script flags] [-- script flags]",
        description="Submit a tinydino script as a submitit job (SLURM, or --local). Flags not listed here go to "
        "the script (see its -h).",
        add_help=False,
        allow_abbrev=False,  # an abbreviation of a script flag must never be taken for a launcher flag
    )
    job = parser.add_argument_group("job")
    job.add_argument(
        "--script", default="main_dino", choices=list(SCRIPTS), help="the script the job runs (default: %(default)s)"
    )
    job.add_argument("--nodes", default=1, type=int, help="number of nodes (default: %(default)s)")
    job.add_argument(
        "--ngpus",
        default=1,
        type=int,
        help="GPUs per node, one task per GPU (default: %(default)s; 0: a CPU-only job that requests no GPU, "
        "see --tasks_per_node)",
    )
    job.add_argument(
        "--tasks_per_node",
        default=None,
        type=int,
        help="tasks (processes) per node; default --ngpus, or 1 with --ngpus 0; must equal --ngpus when it is > 0",
    )
    job.add_argument(
        "--cpus_per_task", default=8, type=int, help="CPUs per task (data workers + 1; default: %(default)s)"
    )
    job.add_argument("--mem_gb", default=None, type=float, help="memory per node in GB (default: the partition's)")
    job.add_argument(
        "--timeout", default=2880, type=int, help="time limit of one run of the job, in minutes (default: %(default)s)"
    )
    job.add_argument("--job_name", default=None, type=str, help="SLURM job name (default: tinydino-<script>)")
    job.add_argument(
        "--job_dir",
        default=None,
        type=str,
        help="submitit folder for the job's pickles and logs; %%j is the job id "
        "(default: <the script's --output_dir>/submitit/%%j)",
    )

    slurm = parser.add_argument_group("SLURM")
    slurm.add_argument("--partition", default=None, type=str, help="partition (default: the cluster's default)")
    slurm.add_argument("--account", default=None, type=str, help="account to charge")
    slurm.add_argument("--qos", default=None, type=str, help="quality of service")
    slurm.add_argument("--comment", default=None, type=str, help="comment shown by squeue")
    slurm.add_argument("--constraint", default=None, type=str, help="node features, e.g. volta32gb")
    slurm.add_argument("--exclude", default=None, type=str, help="nodes not to use, e.g. node[01-03]")
    slurm.add_argument(
        "--signal_delay_s",
        default=120,
        type=int,
        help="SLURM sends SIGUSR2 this many seconds before the time limit: the run saves and is requeued "
        "(default: %(default)s)",
    )
    slurm.add_argument(
        "--max_num_timeout",
        default=3,
        type=int,
        help="requeue after a time-out at most this many times (default: %(default)s; preemptions are always requeued)",
    )

    run = parser.add_argument_group("launcher")
    run.add_argument("--local", action="store_true", help="run on this machine with submitit's local executor")
    run.add_argument("--wait", action="store_true", help="wait for the job; report its result or its error")
    run.add_argument("-h", "--help", action="store_true", help="show this help and the script's flags, and exit")
    return parser


def split_argv(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the launcher's flags, the script's flags): the launcher keeps only its own flags; the rest, and everything
    after a ``--``, goes to the script in its original order."""
    if "--" in argv:
        cut = argv.index("--")
        own, after = argv[:cut], argv[cut + 1 :]
    else:
        own, after = argv, []
    parser = get_args_parser()

    def error(message: str):
        raise UsageError(message)

    parser.error = error  # type: ignore[method-assign]
    args, rest = parser.parse_known_args(own)
    return args, rest + after


def tasks_per_node(args: argparse.Namespace) -> int:
    if args.tasks_per_node is None:
        return args.ngpus if args.ngpus > 0 else 1
    return args.tasks_per_node


def validate_args(args: argparse.Namespace) -> None:
    problems = []
    for name in ("nodes", "cpus_per_task", "timeout"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be positive (got {getattr(args, name)})")
    if args.ngpus < 0:
        problems.append(f"--ngpus must be >= 0 (got {args.ngpus})")
    if args.tasks_per_node is not None and args.tasks_per_node < 1:
        problems.append(f"--tasks_per_node must be positive (got {args.tasks_per_node})")
    elif args.tasks_per_node is not None and args.ngpus > 0 and args.tasks_per_node != args.ngpus:
        problems.append(
            f"one task per GPU: --tasks_per_node ({args.tasks_per_node}) must equal --ngpus ({args.ngpus}); "
            "use --ngpus 0 for a CPU-only job"
        )
    if args.mem_gb is not None and args.mem_gb <= 0:
        problems.append(f"--mem_gb must be positive (got {args.mem_gb})")
    if args.signal_delay_s < 0 or args.max_num_timeout < 0:
        problems.append("--signal_delay_s and --max_num_timeout must be >= 0")
    if args.local and args.nodes != 1:
        problems.append("--local runs on this machine: --nodes must be 1")
    if problems:
        raise UsageError("; ".join(problems))


def default_job_dir(script_args: argparse.Namespace) -> Path:
    return Path(getattr(script_args, "output_dir", None) or ".") / "submitit" / "%j"


def build_executor(args: argparse.Namespace, job_dir: Path):
    """A submitit executor for SLURM (or the local executor with ``--local``) with the launcher's resources."""
    import submitit

    if not args.local and shutil.which("sbatch") is None:
        raise UsageError("no SLURM here (sbatch not found): use --local to run on this machine")
    try:
        executor = submitit.AutoExecutor(
            folder=job_dir, cluster="local" if args.local else "slurm", slurm_max_num_timeout=args.max_num_timeout
        )
    except RuntimeError as exc:  # e.g. srun missing
        raise UsageError(f"cannot use SLURM here ({exc}): use --local to run on this machine") from None
    pythonpath = f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"
    threads = f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{args.cpus_per_task}}}"
    params = {
        "name": args.job_name or f"tinydino-{args.script}",
        "timeout_min": args.timeout,
        "nodes": args.nodes,
        "tasks_per_node": tasks_per_node(args),
        "cpus_per_task": args.cpus_per_task,
        "mem_gb": args.mem_gb,
        "gpus_per_node": args.ngpus if args.ngpus > 0 else None,  # no GPU request at all on a CPU-only job
        "slurm_signal_delay_s": args.signal_delay_s,
        "slurm_partition": args.partition,
        "slurm_account": args.account,
        "slurm_qos": args.qos,
        "slurm_comment": args.comment,
        "slurm_constraint": args.constraint,
        "slurm_exclude": args.exclude,
        # a task that fails ends the job at once, instead of leaving the others waiting in a collective
        "slurm_srun_args": ["--kill-on-bad-exit=1"],
        "slurm_setup": [pythonpath, threads],
        "local_setup": [pythonpath, threads],
    }
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def submit(argv: list[str]):
    """Check the flags, submit the job and print where it runs; returns (job, launcher args, script args)."""
    args, script_argv = split_argv(argv)
    if args.help:
        get_args_parser().print_help()
        print(f"\nflags of {args.script}.py (passed through):\n")
        print(SCRIPTS[args.script].parser().format_help())
        raise SystemExit(0)
    validate_args(args)
    script_args = SCRIPTS[args.script].parse(script_argv)  # a bad flag fails here, before any submission
    job_dir = Path(args.job_dir) if args.job_dir else default_job_dir(script_args)
    executor = build_executor(args, job_dir.expanduser().absolute())

    from submitit.core.utils import FailedJobError

    try:
        job = executor.submit(ScriptJob(SCRIPTS[args.script], script_argv))
    except FailedJobError as exc:  # sbatch refused the job (unknown partition, too many resources, ...)
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise UsageError(f"submission refused: {lines[-1] if lines else exc}") from None
    first = job.task(0)
    where = "this machine (local executor)" if args.local else f"{args.nodes} node(s)"
    print(f"submitted job {job.job_id}: {args.script}.py as {job.num_tasks} task(s) on {where}", flush=True)
    print(f"  stdout: {first.paths.stdout}")
    print(f"  stderr: {first.paths.stderr}")
    if job.num_tasks > 1:
        print(f"  (task N logs to {str(first.paths.stdout).replace('_0_log', '_N_log')} and .err)")
    print(f"  follow: tail -f {first.paths.stdout}")
    output_dir = getattr(script_args, "output_dir", None)
    if output_dir:
        print(f"  output: {output_dir}  (TensorBoard: tensorboard --logdir {output_dir})", flush=True)
    return job, args, script_args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with user_errors(PROG):
        job, args, _ = submit(argv)
    if not args.wait:
        return 0
    from submitit.core.utils import UncompletedJobError

    try:
        result = wait_for_job(job)
    except UncompletedJobError as exc:  # FailedJobError too
        print(f"{PROG}: error: job {job.job_id} failed: {failure_reason(exc)}", file=sys.stderr)
        print(f"  logs: {job.task(0).paths.stderr} (and the other tasks' beside it)", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        going_on = "" if args.local else f": it goes on (scancel {job.job_id} stops it)"
        print(f"\nstopped waiting for job {job.job_id}{going_on}", file=sys.stderr, flush=True)
        return 130
    print(f"job {job.job_id} finished: {json.dumps(result, default=str)[:2000]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
