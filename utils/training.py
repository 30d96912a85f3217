"""One DINO training step and one epoch: forward the teacher and the student, the loss, the update, the EMA."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from utils.distributed import all_reduce_sum, get_world_size
from utils.loss import DINOLoss
from utils.monitoring import ProgressMeter, TensorBoard, log
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


def train_step(
    state: DINOState, crops: list[torch.Tensor], epoch: int, schedule: StepSchedule, stop: bool = False
) -> dict[str, float]:
    """One DINO iteration on a batch of multi-crop views ``crops`` (``2 + n`` tensors ``[B, 3, S, S]``).

    The teacher sees the 2 global views, the student all views; the loss's gradient updates the student (gradient
    clipped to a global norm, the head's last layer frozen during the first epochs), then the teacher takes an EMA
    step. A non-finite loss or gradient (on any process) skips the update and the EMA and is counted. Returns the
    step's scalars (loss averaged over processes, gradient norm, collapse indicators), as floats; ``stop`` is 1 when
    any process asked to stop (its ``stop`` argument), so that all stop after the same step.
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
    flags = torch.tensor([float(stop)], device=loss.device)
    check = all_reduce_sum(torch.cat([loss.detach().float().view(1), grad_norm.float().to(loss.device).view(1), flags]))
    loss_value, norm_value, stop_votes = check.tolist()
    loss_value, norm_value = loss_value / get_world_size(), norm_value / get_world_size()  # the norm: same everywhere
    result = {"loss": loss_value, "grad_norm": norm_value, "stop": float(stop_votes > 0)}
    if not math.isfinite(loss_value) or (state.scaler is None and not math.isfinite(norm_value)):
        # fp16's GradScaler handles non-finite gradients itself (it skips and lowers the scale); a non-finite loss
        # is skipped in every precision: no optimiser step, no EMA, no centre update (see DINOLoss.update_center).
        state.optimizer.zero_grad(set_to_none=True)
        if state.scaler is not None:
            state.scaler.update(state.scaler.get_scale() / 2)
        state.nonfinite_steps += 1
        state.consecutive_nonfinite += 1
        return {**result, "skipped": 1.0}
    if state.scaler is not None:
        state.scaler.step(state.optimizer)  # skips the step itself when the unscaled gradients are not finite
        state.scaler.update()
    else:
        state.optimizer.step()
    state.consecutive_nonfinite = 0
    ema_update(state.ema_pairs[0], state.ema_pairs[1], schedule.momentum)
    stats = {k: float(v) for k, v in state.loss.last_stats.items()}
    return {**result, "skipped": 0.0, **stats}


@dataclass
class EpochPlan:
    """Where one pass over the loader starts and what it may do besides training."""

    epoch: int
    global_iter: int  # global iteration count when the pass starts
    start_iter: int = 0  # iterations of this epoch already done (a mid-epoch resume)
    max_iters: int | None = None  # stop once the global count reaches this
    checkpoint_every: int = 0  # call ``save`` every this many global iterations (0: never mid-epoch)
    print_freq: int = 10
    max_nonfinite: int = 10
    header: str = ""


@dataclass
class EpochResult:
    averages: dict[str, float]
    global_iter: int
    finished: bool  # the whole epoch was trained
    stop_signal: bool  # a stop was requested (signal): the caller saves and exits
    bad_images: int


def train_one_epoch(
    state: DINOState,
    loader,
    plan: EpochPlan,
    schedules: dict[str, np.ndarray],
    tb: TensorBoard,
    save=None,
    stop_request=None,
    collapse: CollapseMonitor | None = None,
) -> EpochResult:
    """One pass over ``loader`` (items ``(crops, labels, n_skipped)``) from ``plan.start_iter``.

    ``schedules`` holds per-iteration arrays ``lr``, ``wd``, ``momentum`` indexed by the global iteration.
    ``save(epoch, iter_in_epoch, global_iter)`` is called every ``plan.checkpoint_every`` global iterations. The pass
    ends early at ``plan.max_iters`` or when a stop is requested (on any process). Per-iteration scalars go to
    TensorBoard under ``train/``.
    """
    niter = plan.start_iter + len(loader)
    end = niter if plan.max_iters is None else min(niter, plan.start_iter + plan.max_iters - plan.global_iter)
    meter = ProgressMeter(end, plan.header or f"Epoch {plan.epoch}", state.device, plan.print_freq, plan.start_iter)
    teacher_temp = state.loss.teacher_temp(plan.epoch)
    global_iter, iteration, bad_images, stopped = plan.global_iter, plan.start_iter, 0, False
    for crops, _, n_skipped in loader:
        if iteration >= end:
            break
        schedule = StepSchedule(
            float(schedules["lr"][global_iter]),
            float(schedules["wd"][global_iter]),
            float(schedules["momentum"][global_iter]),
        )
        stats = train_step(state, crops, plan.epoch, schedule, stop=stop_request is not None and stop_request.requested)
        if state.consecutive_nonfinite >= plan.max_nonfinite:
            raise NonFiniteLossError(
                f"{state.consecutive_nonfinite} consecutive non-finite losses at iteration {global_iter}: stopping "
                f"(the last checkpoint is intact). {NONFINITE_ADVICE}"
            )
        bad_images += int(n_skipped.sum())
        meter.update(crops[0].shape[0] * get_world_size(), loss=stats["loss"], lr=schedule.lr, wd=schedule.weight_decay)
        scalars = {
            **{k: v for k, v in stats.items() if k != "stop"},
            "lr": schedule.lr,
            "weight_decay": schedule.weight_decay,
            "teacher_momentum": schedule.momentum,
            "teacher_temp": teacher_temp,
            "images_per_s": meter.images_per_second(),
        }
        tb.scalars(scalars, global_iter, prefix="train/")
        if collapse is not None and stats["skipped"] == 0:
            collapse.update(stats)
        global_iter += 1
        iteration += 1
        stopped = stats["stop"] > 0
        if save is not None and (stopped or (plan.checkpoint_every and global_iter % plan.checkpoint_every == 0)):
            save(plan.epoch, iteration, global_iter)
        if stopped:
            break
    averages = meter.averages()
    averages["epoch_time_s"] = meter.elapsed()
    averages["nonfinite_steps"] = float(state.nonfinite_steps)
    averages["bad_images"] = float(bad_images)
    return EpochResult(averages, global_iter, iteration >= niter, stopped, bad_images)


class CollapseMonitor:
    """Warns when the teacher looks collapsed for ``patience`` consecutive steps: a constant output (entropy of its
    mean distribution near 0) or a uniform one (per-sample entropy near ``log(out_dim)``)."""

    def __init__(self, out_dim: int, patience: int = 200, tolerance: float = 0.05):
        self.log_dim, self.patience, self.tolerance = math.log(out_dim), patience, tolerance
        self.constant_steps = self.uniform_steps = 0
        self.warned = False

    def update(self, stats: dict[str, float]) -> str | None:
        """Feed one step's collapse indicators; returns (and logs, once) a warning when collapse is sustained."""
        mean_h, sample_h = stats.get("teacher_mean_entropy"), stats.get("teacher_sample_entropy")
        if mean_h is None or sample_h is None:
            return None
        self.constant_steps = self.constant_steps + 1 if mean_h < self.tolerance * self.log_dim else 0
        self.uniform_steps = self.uniform_steps + 1 if sample_h > (1 - self.tolerance) * self.log_dim else 0
        kind = None
        if self.constant_steps >= self.patience:
            kind = ("constant", "use a lower --lr, a higher --momentum_teacher or a longer --warmup_epochs")
        elif self.uniform_steps >= self.patience:
            kind = ("uniform", "lower --teacher_temp (a sharper teacher) or use a longer --warmup_teacher_temp_epochs")
        if kind is None or self.warned:
            return None
        self.warned = True
        message = (
            f"warning: the teacher's output has been {kind[0]} for {self.patience} steps (collapse): {kind[1]}"
        )
        log(message)
        return message
