"""One DINO training step and one epoch: forward the teacher and the student, the loss, the update, the EMA."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from utils.distributed import all_reduce_sum, get_world_size
from utils.loss import DINOLoss
from utils.monitoring import ProgressMeter, TensorBoard
from utils.optim import autocast, cancel_gradients_last_layer, clip_gradients, ema_update, set_schedule_values


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: the run stops rather than save a broken model."""


NONFINITE_ADVICE = (
    "usual remedies: --precision fp32 or bf16 instead of fp16, a lower --lr, a lower --teacher_temp "
    "(or a longer --warmup_teacher_temp_epochs), and gradient clipping (--clip_grad 3.0)"
)


@dataclass
class DINOState:
    """Everything a training step touches. ``student`` may be wrapped in DDP; ``student_module`` is the bare one."""

    student: nn.Module
    teacher: nn.Module
    student_module: nn.Module
    loss: DINOLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    device: torch.device
    precision: str = "fp32"
    clip_grad: float = 3.0
    freeze_last_layer: int = 1
    nonfinite_steps: int = 0
    consecutive_nonfinite: int = 0
    ema_pairs: tuple[list, list] = field(default_factory=lambda: ([], []))

    def __post_init__(self):
        teacher_params = list(self.teacher.parameters())
        student_params = list(self.student_module.parameters())
        if len(teacher_params) != len(student_params):
            raise ValueError("student and teacher do not have the same parameters")
        self.ema_pairs = (teacher_params, student_params)


@dataclass(frozen=True)
class StepSchedule:
    """The scheduled values of one iteration."""

    lr: float
    weight_decay: float
    momentum: float


def train_step(state: DINOState, crops: list[torch.Tensor], epoch: int, schedule: StepSchedule) -> dict[str, float]:
    """One DINO iteration on a batch of multi-crop views ``crops`` (``2 + n`` tensors ``[B, 3, S, S]``).

    The teacher sees the 2 global views, the student all views; the loss's gradient updates the student (gradient
    clipped to a global norm, the head's last layer frozen during the first epochs), then the teacher takes an EMA
    step. A non-finite loss or gradient (on any process) skips the update and the EMA and is counted. Returns the
    step's scalars (loss averaged over processes, gradient norm, collapse indicators), as floats.
    """
    set_schedule_values(state.optimizer, schedule.lr, schedule.weight_decay)
    crops = [c.to(state.device, non_blocking=True) for c in crops]
    with autocast(state.device, state.precision):
        with torch.no_grad():
            teacher_output = state.teacher(crops[:2])
        student_output = state.student(crops)
        loss = state.loss(student_output, teacher_output, epoch)

    state.optimizer.zero_grad(set_to_none=True)
    params = [p for p in state.student_module.parameters() if p.requires_grad]
    if state.scaler is not None:
        state.scaler.scale(loss).backward()
        state.scaler.unscale_(state.optimizer)
    else:
        loss.backward()
    grad_norm = clip_gradients(params, state.clip_grad)
    cancel_gradients_last_layer(epoch, state.student_module, state.freeze_last_layer)

    # One host synchronisation per step: the decision to update must agree across processes.
    check = all_reduce_sum(torch.stack([loss.detach().float(), grad_norm.float().to(loss.device)]))
    loss_value, norm_value = (check / get_world_size()).tolist()  # the norm is the same on every process
    if state.scaler is None and not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        state.optimizer.zero_grad(set_to_none=True)
        state.nonfinite_steps += 1
        state.consecutive_nonfinite += 1
        return {"loss": loss_value, "grad_norm": norm_value, "skipped": 1.0}
    if state.scaler is not None:
        state.scaler.step(state.optimizer)  # skips the step itself when the unscaled gradients are not finite
        state.scaler.update()
        if not math.isfinite(loss_value):
            state.nonfinite_steps += 1
            state.consecutive_nonfinite += 1
            return {"loss": loss_value, "grad_norm": norm_value, "skipped": 1.0}
    else:
        state.optimizer.step()
    state.consecutive_nonfinite = 0
    ema_update(state.ema_pairs[0], state.ema_pairs[1], schedule.momentum)
    stats = {k: float(v) for k, v in state.loss.last_stats.items()}
    return {"loss": loss_value, "grad_norm": norm_value, "skipped": 0.0, **stats}


def train_one_epoch(
    state: DINOState,
    loader,
    epoch: int,
    schedules: dict[str, np.ndarray],
    global_iter: int,
    tb: TensorBoard,
    print_freq: int = 10,
    max_nonfinite: int = 10,
    max_iters: int | None = None,
    header: str = "",
) -> tuple[dict[str, float], int]:
    """One pass over ``loader``; returns the epoch's averaged scalars and the global iteration count after it.

    ``schedules`` holds per-iteration arrays ``lr``, ``wd``, ``momentum`` indexed by the global iteration. Stops early
    when the global iteration reaches ``max_iters``. Per-iteration scalars go to TensorBoard under ``train/``.
    """
    niter = len(loader)
    if max_iters is not None:
        niter = min(niter, max_iters - global_iter)
    meter = ProgressMeter(niter, header or f"Epoch {epoch}", state.device, print_freq)
    teacher_temp = state.loss.teacher_temp(epoch)
    for i, (crops, _) in enumerate(loader):
        if i >= niter:
            break
        schedule = StepSchedule(
            float(schedules["lr"][global_iter]),
            float(schedules["wd"][global_iter]),
            float(schedules["momentum"][global_iter]),
        )
        stats = train_step(state, crops, epoch, schedule)
        if state.consecutive_nonfinite >= max_nonfinite:
            raise NonFiniteLossError(
                f"{state.consecutive_nonfinite} consecutive non-finite losses at iteration {global_iter}: stopping "
                f"(the last checkpoint is intact). {NONFINITE_ADVICE}"
            )
        batch_images = crops[0].shape[0] * get_world_size()
        meter.update(batch_images, loss=stats["loss"], lr=schedule.lr, wd=schedule.weight_decay)
        scalars = {
            **stats,
            "lr": schedule.lr,
            "weight_decay": schedule.weight_decay,
            "teacher_momentum": schedule.momentum,
            "teacher_temp": teacher_temp,
            "images_per_s": meter.images_per_second(),
        }
        tb.scalars(scalars, global_iter, prefix="train/")
        global_iter += 1
    averages = meter.averages()
    averages["epoch_time_s"] = meter.elapsed()
    averages["nonfinite_steps"] = float(state.nonfinite_steps)
    return averages, global_iter
