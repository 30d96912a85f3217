import pytest
import torch

from tests.conftest import run_script
from utils.runtime.distributed import first_slurm_host, launcher_env, slurm_port


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("optimizer", "centering"), [("sgd", "centering"), ("adamw", "centering"), ("adamw", "sinkhorn_knopp")]
)
def test_two_process_step_equals_one_process_step_on_whole_batch(tmp_path, optimizer, centering):
    """Two steps with the batch split over 2 gloo processes == the same steps on 1 process with the whole batch.

    SGD makes a wrong gradient scale visible (AdamW is nearly scale-invariant); AdamW is the default optimiser.
    Sinkhorn-Knopp's targets depend on the whole global batch: a per-process normalisation would differ.
    Tolerance: 1e-5 absolute is 1% of one step's update (lr 1e-3), far below any real discrepancy. AdamW runs with
    eps 1e-3 in both: with its default eps, each of Adam's first steps is about lr * sign(gradient), so a gradient
    that is near zero up to rounding (e.g. rounding that depends on the batch size: the head's last layer computes
    ``V @ x.T`` blockwise, and the BLAS picks its kernels by shape) moves a whole lr either way in each run.
    """
    one, two = tmp_path / "one.pth", tmp_path / "two.pth"
    result = run_script(["tests/train/dist_step_worker.py", str(one), optimizer, centering])
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_script(["tests/train/dist_step_worker.py", str(two), optimizer, centering], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    for model in ("student", "teacher"):
        for key, value in a[model].items():
            torch.testing.assert_close(value, b[model][key], rtol=1e-4, atol=1e-5, msg=f"{model}.{key}")
    torch.testing.assert_close(a["center"], b["center"], rtol=1e-5, atol=1e-7)
    # The steps moved the student well away from the teacher (an EMA at momentum 0.9 lags behind it), and the
    # two runs differ by far less than that move.
    gap = sum((a["student"][k] - a["teacher"][k]).pow(2).sum() for k in a["student"]).sqrt()
    error = sum((a["student"][k] - b["student"][k]).pow(2).sum() for k in a["student"]).sqrt()
    assert error < 0.01 * gap, (error, gap)


def test_launcher_env_torchrun_slurm_and_alone():
    assert launcher_env({}) is None
    torchrun = launcher_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "5"})
    assert torchrun == {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "5"}
    slurm = launcher_env(
        {
            "SLURM_PROCID": "3",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "3",
            "SLURM_JOB_NODELIST": "gpu[012-013]",
            "SLURM_JOB_ID": "123456",
        }
    )
    assert slurm["RANK"] == "3" and slurm["WORLD_SIZE"] == "8" and slurm["LOCAL_RANK"] == "3"
    assert slurm["MASTER_PORT"] == str(slurm_port("123456"))
    assert slurm["MASTER_ADDR"] in ("gpu012",)
    assert launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None  # a single task runs alone


def test_slurm_helpers():
    assert first_slurm_host("node[003-005,7],gpu1") in ("node003",)
    assert first_slurm_host("solo") == "solo"
    # the rule: 20000 + (the job id's last four digits) % 10000, so every task of a job derives the same port
    ports = [slurm_port(job_id) for job_id in ("99999999", "42", "123456", "7_3")]
    assert ports == [29999, 20042, 23456, 20073]
