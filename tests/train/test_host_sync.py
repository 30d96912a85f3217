"""The training step never waits for the device: no ``.item()`` (``aten::_local_scalar_dense``) per step, counted
with PyTorch's CPU profiler over several steps, for each optimiser and precision; the host reads the steps' numbers
once per print interval."""

import pytest
import torch

from tests.helpers import random_crops as batches
from tests.train.test_precision import make_state
from utils.runtime.monitoring import TensorBoard
from utils.train.step import EpochPlan, StepSchedule, train_one_epoch, train_step

#: Fused optimiser kernels whose CPU implementation reads its own CPU-resident step counters with ``item()``; their
#: CUDA kernels read them on the device. Reads inside them are not host synchronisations of the training step.
CPU_KERNEL_INTERNALS = ("aten::_fused_adamw_", "aten::_fused_adam_", "aten::_fused_sgd_")


def host_syncs(fn) -> int:
    """How many host reads of a tensor's value (``aten::_local_scalar_dense``: ``.item()``, ``bool(t)``,
    ``float(t)``, a tensor passed where a number is expected) ``fn()`` makes; each waits for the device on a GPU."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    reads = [event for event in prof.events() if event.name == "aten::_local_scalar_dense"]
    return sum(1 for event in reads if not any(name in CPU_KERNEL_INTERNALS for name in ancestors(event)))


def ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent.name
        parent = parent.cpu_parent


@pytest.mark.parametrize(
    "precision, optimizer, clip_mode",
    [("fp32", "adamw", "param"), ("fp32", "adamw", "global"), ("fp32", "sgd", "param"), ("fp16", "adamw", "param")],
)
def test_train_steps_make_no_host_synchronisation(precision, optimizer, clip_mode):
    state = make_state(precision, optimizer=optimizer)
    state.clip_grad_mode = clip_mode
    crops = batches(3)
    schedule = StepSchedule(lr=1e-3, weight_decay=0.04, momentum=0.99)
    train_step(state, crops[0], 0, schedule)  # first step: lazy optimiser state
    assert host_syncs(lambda: [train_step(state, c, 1, schedule) for c in crops[1:]]) == 0


def test_an_epoch_reads_the_host_once_per_print_interval():
    state = make_state("fp32")
    loader = [(crops, None, torch.zeros(4, dtype=torch.int64)) for crops in batches(6)]
    values = {"lr": 1e-3, "wd": 0.04, "momentum": 0.99}
    schedules = {key: torch.full((6,), value).numpy() for key, value in values.items()}
    plan = EpochPlan(epoch=1, global_iter=0, print_freq=3)
    syncs = host_syncs(lambda: train_one_epoch(state, loader, plan, schedules, TensorBoard(None)))
    # per reading: the steps' numbers (one transfer), the loader's skipped-image counts, the stop flag
    assert syncs <= 2 * (6 // 3 + 1) * 3
