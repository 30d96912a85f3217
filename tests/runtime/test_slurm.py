"""run_with_submitit.py: argument splitting, one-line errors, the local executor, and a real one-node SLURM cluster.

The SLURM tests start their own cluster (tests/slurm/cluster.sh, as root, Debian's slurmctld/slurmd/munge packages)
once per session and stop it at the end; they are skipped, with the reason, where it cannot start, except under CI
(environment variable ``CI`` set) on a machine that can have SLURM (root, with apt-get): there they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import types
from pathlib import Path

import pytest

import run_with_submitit
import utils.runtime.slurm
from run_with_submitit import SCRIPTS
from tests.conftest import ROOT, TINY_TRAIN_FLAGS
from utils.runtime.errors import UsageError
from utils.runtime.slurm import failure_reason, wait_for_job

SLURM_DIR = ROOT / "tests" / "slurm"
CPU_JOB = ["--ngpus", "0", "--cpus_per_task", "1", "--timeout", "20"]


def pretrain_flags(data: Path, out: Path, epochs: int = 1) -> list[str]:
    where = ["--data_path", str(data), "--output_dir", str(out)]
    return [*TINY_TRAIN_FLAGS, *where, "--epochs", str(epochs), "--knn_every", "0"]


def logged_epochs(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]


# ---- launcher flags (no cluster) ----------------------------------------------------------------------------------
def test_split_argv_keeps_launcher_flags_and_passes_the_rest_in_order():
    args, rest = run_with_submitit.split_argv(
        ["--nodes", "2", "--epochs", "3", "--ngpus", "4", "--local_crops_number", "6", "--arch", "vit_small"]
    )
    assert (args.nodes, args.ngpus, args.local, args.script) == (2, 4, False, "main_dino")
    assert rest == ["--epochs", "3", "--local_crops_number", "6", "--arch", "vit_small"]
    # everything after "--" is the script's, even a launcher flag's name; abbreviations are never the launcher's
    args, rest = run_with_submitit.split_argv(["--script", "eval_knn", "--loc", "x", "--", "--nodes", "5"])
    assert args.script == "eval_knn" and args.nodes == 1 and not args.local
    assert rest == ["--loc", "x", "--nodes", "5"]


def test_the_launcher_runs_each_scripts_main_on_parsed_flags():
    import eval_knn
    import eval_linear
    import eval_stl10
    import main_dino

    modules = {"main_dino": main_dino, "eval_knn": eval_knn, "eval_linear": eval_linear, "eval_stl10": eval_stl10}
    assert {name: entry.main for name, entry in SCRIPTS.items()} == {n: m.main for n, m in modules.items()}
    assert SCRIPTS["eval_knn"].parse(["--nb_knn", "3"]).nb_knn == [3]
    with pytest.raises(UsageError, match="--nb_knn values must be positive"):  # the script's own checks
        SCRIPTS["eval_knn"].parse(["--nb_knn", "0"])


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_no_launcher_flag_shadows_a_script_flag(script):
    launcher = {s for a in run_with_submitit.get_args_parser()._actions for s in a.option_strings} - {"-h", "--help"}
    flags = {s for a in SCRIPTS[script].parser()._actions for s in a.option_strings}
    assert not launcher & flags


def test_tasks_follow_gpus_and_cpu_jobs_choose_their_tasks():
    parse = run_with_submitit.split_argv
    assert run_with_submitit.tasks_per_node(parse(["--ngpus", "8"])[0]) == 8
    assert run_with_submitit.tasks_per_node(parse(["--ngpus", "0"])[0]) == 1
    assert run_with_submitit.tasks_per_node(parse(["--ngpus", "0", "--tasks_per_node", "3"])[0]) == 3
    with pytest.raises(UsageError, match="one task per GPU"):
        run_with_submitit.validate_args(parse(["--ngpus", "2", "--tasks_per_node", "3"])[0])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bad_flag", "1"], "main_dino.py: unrecognized arguments: --bad_flag 1"),
        (["--epochs", "0"], "--epochs must be positive"),
        (["--script", "eval_knn", "--nb_knn", "0"], "--nb_knn values must be positive"),
        (["--nodes", "0"], "--nodes must be positive"),
        (["--local", "--nodes", "2"], "--nodes must be 1"),
    ],
)
def test_bad_flags_are_a_one_line_error_before_anything_is_submitted(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_with_submitit.main([*argv, "--job_dir", str(tmp_path / "jobs"), "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("run_with_submitit.py: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "jobs").exists()


def test_help_lists_the_launcher_and_the_script_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_with_submitit.main(["--script", "eval_linear", "-h"])
    printed = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--partition" in printed and "--n_last_blocks" in printed


def test_without_slurm_the_launcher_points_to_local(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    with pytest.raises(SystemExit):
        run_with_submitit.main(["--ngpus", "0", "--output_dir", str(tmp_path)])
    assert "use --local" in capsys.readouterr().err


def test_failure_reason_is_the_last_line_of_the_trace():
    from submitit.core.utils import FailedJobError

    exc = FailedJobError(
        "Job (task=0) failed during processing with trace:\n----------------------\nTraceback (most recent call "
        'last):\n  File "x.py", line 1\nutils.runtime.errors.DatasetError: no images in /nowhere\n'
        "----------------------\n"
        "You can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n  - /a.err\n  - /a.out"
    )
    assert failure_reason(exc) == "utils.runtime.errors.DatasetError: no images in /nowhere"


@pytest.mark.parametrize(
    ("rank", "stop", "expected"),
    [
        (1, "SIGUSR2", "exit 0"),  # other ranks leave quietly: rank 0 requeues
        (0, "SIGUSR2", "requeue"),  # rank 0 hands the signal back to submitit
        (0, "SIGTERM", "message"),  # no preemption signal follows: exit with a message, no result
    ],
)
def test_a_stopped_run_hands_over_to_submitit(rank, stop, expected, monkeypatch):
    sent = []

    def fake_kill(pid, sig):  # submitit's handler, as installed in a job: checkpoint, requeue, exit
        sent.append(sig)
        raise SystemExit(-1)

    monkeypatch.setattr(utils.runtime.slurm.os, "kill", fake_kill)
    monkeypatch.setattr(utils.runtime.slurm, "PREEMPT_WAIT_S", 0.0)
    job = utils.runtime.slurm.ScriptJob(SCRIPTS["main_dino"], ["--epochs", "1"])
    with pytest.raises(SystemExit) as exit_info:
        job.stopped(stop, types.SimpleNamespace(global_rank=rank), "runs/x")
    if expected == "exit 0":
        assert exit_info.value.code == 0 and not sent
    elif expected == "requeue":
        assert sent == [signal.SIGUSR2] and exit_info.value.code == -1
    else:
        assert not sent and "stopped by SIGTERM after saving a checkpoint in runs/x" in str(exit_info.value.code)


def test_local_executor_runs_two_tasks(small_synthetic, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    argv = ["--local", *CPU_JOB, "--tasks_per_node", "2", "--wait", *pretrain_flags(small_synthetic, out)]
    assert run_with_submitit.main(argv) == 0
    printed = capsys.readouterr().out
    assert "submitted job" in printed and "finished" in printed
    assert logged_epochs(out) == [0]
    assert "2 process(es)" in next((out / "submitit").glob("*/*_0_log.out")).read_text()


@pytest.mark.parametrize(
    ("ci", "euid", "apt", "outcome"),
    [
        ("1", 0, "/usr/bin/apt-get", "fail"),
        ("", 0, "/usr/bin/apt-get", "skip"),
        ("1", 1000, "/usr/bin/apt-get", "skip"),
        ("1", 0, None, "skip"),
    ],
)
def test_a_cluster_that_cannot_start_fails_under_ci_where_slurm_can_run(ci, euid, apt, outcome, monkeypatch):
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    monkeypatch.setattr(shutil, "which", lambda name, **kw: apt if name == "apt-get" else None)
    expected = pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception
    with pytest.raises(expected, match="did not start"):
        skip_or_fail("the SLURM test cluster did not start: x")


# ---- a real SLURM cluster -----------------------------------------------------------------------------------------
def slurm_required() -> bool:
    """Under CI (``CI`` set) on a machine where ``.ci/run`` installs SLURM (root with apt-get), the cluster must run."""
    return bool(os.environ.get("CI")) and os.geteuid() == 0 and shutil.which("apt-get") is not None


def skip_or_fail(reason: str) -> None:
    if slurm_required():
        pytest.fail(f"{reason} (CI is set and this machine can run SLURM: not skipping)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Path:
    """A one-node SLURM cluster for the session (its slurm.conf), stopped at the end even when tests fail."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
    missing = [c for c in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(c, path=search) is None]
    if missing:
        skip_or_fail(
            f"SLURM not installed ({', '.join(missing)} missing: apt-get install slurmctld slurmd slurm-client munge)"
        )
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs slurmd as root")
    folder = tmp_path_factory.mktemp("slurm")
    script = str(SLURM_DIR / "cluster.sh")
    started = subprocess.run([script, "start", str(folder)], capture_output=True, text=True, timeout=120)
    try:
        if started.returncode != 0:
            skip_or_fail(f"the SLURM test cluster did not start: {started.stderr.strip()[-2000:]}")
        yield Path(started.stdout.strip().splitlines()[-1].split("=", 1)[1])
    finally:
        subprocess.run([script, "stop", str(folder)], timeout=120)


@pytest.fixture
def slurm(slurm_cluster, monkeypatch):
    """This test talks to the session's cluster: SLURM_CONF set, the sacct stand-in first on PATH, 1 thread."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster))
    monkeypatch.setenv("PATH", f"{SLURM_DIR / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def submit(argv):
    job, _, _ = run_with_submitit.submit(argv)
    return job


def cancel(job):
    if not job.done():
        job.cancel(check=False)


def task_log(job, suffix: str = "out", task: int = 0) -> str:
    path = job.task(task).paths.stdout if suffix == "out" else job.task(task).paths.stderr
    return path.read_text() if path.exists() else ""


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_pretraining_on_two_tasks_then_knn(slurm, small_synthetic, tmp_path, capsys):
    out = tmp_path / "pretrain"
    argv = [*CPU_JOB, "--tasks_per_node", "2", "--wait", *pretrain_flags(small_synthetic, out)]
    assert run_with_submitit.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"stdout: {out / 'submitit'}" in printed and "finished" in printed
    assert (out / "checkpoint.pth").is_file() and logged_epochs(out) == [0]
    assert "2 process(es)" in next((out / "submitit").glob("*/*_0_log.out")).read_text()

    knn_out = tmp_path / "knn"
    knn_flags = ["--pretrained_weights", str(out / "checkpoint.pth"), "--data_path", str(small_synthetic)]
    knn_flags += ["--image_size", "32", "--num_workers", "0", "--nb_knn", "1", "5", "--output_dir", str(knn_out)]
    argv = ["--script", "eval_knn", *CPU_JOB, "--wait", *knn_flags]  # one task (the default without GPUs)
    assert run_with_submitit.main(argv) == 0, capsys.readouterr().err
    record = json.loads((knn_out / "knn_results.json").read_text().splitlines()[-1])
    assert [r["k"] for r in record["results"]] == [1, 5]


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_preemption_checkpoints_requeues_and_resumes(slurm, small_synthetic, tmp_path):
    """SIGUSR2 as SLURM sends it before a time limit or on preemption: the run saves, submitit requeues the job and
    the rerun resumes; every epoch is logged exactly once. One iteration per epoch (40 images, 2 x 16 per step), so
    the stop always lands on an epoch's last step, the edge where an epoch's log line could be lost."""
    out = tmp_path / "preempted"
    flags = [*pretrain_flags(small_synthetic, out, epochs=8), "--batch_size_per_gpu", "16", "--print_freq", "1"]
    job = submit([*CPU_JOB, "--tasks_per_node", "2", *flags])
    try:
        deadline = time.time() + 120
        while "Epoch [0/8]" not in task_log(job):  # training has started: preempt it
            assert time.time() < deadline and not job.done(), task_log(job, "err")
            time.sleep(0.1)
        subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
        record = wait_for_job(job, timeout_s=240)
    finally:
        cancel(job)
    log = task_log(job)
    assert "stop requested (SIGUSR2)" in log and "Requeued job" in log, log
    assert log.count("resumed from") == 1 and "Job completed successfully" in log, log
    assert record["epoch"] == 7
    assert logged_epochs(out) == list(range(8)), log


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.distributed
def test_slurm_job_that_builds_the_image_cache_with_a_decode_pool_completes(
    slurm, small_synthetic, tmp_path, monkeypatch
):
    """Rank 0 of a 2-task job builds the image cache with a 2-process decode pool (forced on for this small dataset:
    TINYDINO_CACHE_WORKERS, which the job inherits from the submission) while submitit's signal handlers are
    installed, and rank 1 waits at the barrier. The job must finish (issue 17: the pool's workers inherited
    submitit's SIGTERM handler, one ignored the pool's terminate and the job hung until its time limit)."""
    monkeypatch.setenv("TINYDINO_CACHE_WORKERS", "2")
    out, cache = tmp_path / "run", tmp_path / "cache"
    flags = [*pretrain_flags(small_synthetic, out), "--cache_dir", str(cache), "--cache_images", "on"]
    job = submit([*CPU_JOB, "--tasks_per_node", "2", *flags])
    try:
        record = wait_for_job(job, timeout_s=300)
    finally:
        cancel(job)
    assert "(2 process(es))" in task_log(job, "err"), task_log(job, "err")  # the pool did decode the images
    assert record["epoch"] == 0 and logged_epochs(out) == [0]


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_runtime_failure_reaches_the_user(slurm, tmp_path, capsys):
    start = time.time()
    argv = [*CPU_JOB, "--tasks_per_node", "2", "--wait", *pretrain_flags(tmp_path / "missing", tmp_path / "out")]
    assert run_with_submitit.main(argv) == 1
    err = capsys.readouterr().err
    assert "run_with_submitit.py: error: job" in err and str(tmp_path / "missing") in err, err
    assert time.time() - start < 90
