"""One DINO training step and one epoch: forward the teacher and the student, the loss, the update, the EMA.

The step never waits for the device: whether a step's loss and gradients were finite is decided on the device (all
processes agree through an all-reduce) and gates the optimiser (the fused optimisers' ``found_inf``, or fp16's
GradScaler) and the EMA (a zero weight). A step returns :class:`StepStats`, 0-d device tensors that the host reads
only every ``print_freq`` iterations, at checkpoints and at the end of the epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from utils.runtime.distributed import all_reduce_sum, get_world_size
from utils.runtime.errors import NonFiniteLossError
from utils.runtime.monitoring import ProgressMeter, TensorBoard, log
from utils.train.loss import DINOLoss, koleo_loss
from utils.train.optim import (
    autocast,
    cancel_gradients_last_layer,
    clip_divisor,
    clip_gradients,
    ema_update,
    gradient_norm,
    set_schedule_values,
)

NONFINITE_ADVICE = (
    "usual remedies: --precision fp32 or bf16 instead of fp16, a lower --lr, a lower --teacher_temp "
    "(or a longer --warmup_teacher_temp_epochs), and gradient clipping (--clip_grad 3.0)"
)


@dataclass(kw_only=True)
class DINOState:
    """Everything a training step touches (built with keywords). ``student`` may be wrapped in DDP or compiled;
    ``student_module`` is the bare student whose parameters the optimiser and the EMA use. The counters are read by
    the host (:class:`_StepReader`) and saved in checkpoints."""

    student: nn.Module
    teacher: nn.Module
    student_module: nn.Module
    loss: DINOLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    device: torch.device
    precision: str = "fp32"
    clip_grad: float = 3.0
    clip_grad_mode: str = "param"  # "param": each parameter's gradient clipped on its own (official); "global"
    freeze_last_layer: int = 1
    koleo_weight: float = 0.0  # DINOv2's KoLeo term on the student's global-crop backbone features (0: off)
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss (or non-finite gradients without a GradScaler)
    consecutive_nonfinite: int = 0
    scaler_backoffs: int = 0  # fp16 steps the GradScaler skipped (overflowed gradients of a finite loss)
    teacher_params: list[torch.Tensor] = field(init=False)
    student_params: list[torch.Tensor] = field(init=False)
    trainable: list[torch.Tensor] = field(init=False)

    def __post_init__(self):
        self.teacher_params = list(self.teacher.parameters())
        self.student_params = list(self.student_module.parameters())
        if len(self.teacher_params) != len(self.student_params):
            raise ValueError("student and teacher do not have the same parameters")
        self.trainable = [p for p in self.student_params if p.requires_grad]

    @property
    def skips_on_device(self) -> bool:
        """Whether the optimiser can skip a step from a device flag (fused kernels take ``found_inf``)."""
        return bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))


class StepStats(NamedTuple):
    """The numbers of one step, each a 0-d float32 tensor on the training device."""

    loss: torch.Tensor  # the DINO loss, averaged over processes
    koleo_loss: torch.Tensor  # the KoLeo term (0 when off), averaged over processes
    grad_norm: torch.Tensor  # global L2 norm of this process's student gradients before clipping (unscaled)
    skipped: torch.Tensor  # 1: a non-finite loss (or gradient, without a GradScaler) on some process skipped the step
    scaler_backoff: torch.Tensor  # 1: fp16's GradScaler skipped the step for overflowed gradients of a finite loss
    teacher_mean_entropy: torch.Tensor  # collapse indicators (nats), see utils.train.loss.collapse_stats
    teacher_sample_entropy: torch.Tensor


@dataclass(frozen=True)
class StepSchedule:
    """The scheduled values of one iteration."""

    lr: float
    weight_decay: float
    momentum: float


def train_step(state: DINOState, crops: list[torch.Tensor], epoch: int, schedule: StepSchedule) -> StepStats:
    """One DINO iteration on a batch of multi-crop views ``crops`` (``2 + n`` tensors ``[B, 3, S, S]``).

    The teacher sees the 2 global views, the student all views; the loss's gradient updates the student (gradients
    clipped as ``state.clip_grad_mode`` says, the head's last layer frozen during the first epochs), then the teacher
    takes an EMA step. A non-finite loss or gradient on any process skips the update and the EMA everywhere (and the
    centre keeps its value). With ``state.koleo_weight > 0`` the student also minimises DINOv2's KoLeo term on its
    backbone features of each global view (computed on each process's own batch, as DINOv2 does).
    """
    set_schedule_values(state.optimizer, schedule.lr, schedule.weight_decay)
    crops = [c.to(state.device, non_blocking=True) for c in crops]
    with autocast(state.device, state.precision):
        with torch.no_grad():
            teacher_output = state.teacher(crops[:2])
        if state.koleo_weight:
            student_output, features = state.student(crops, return_features=True)
            koleo = sum(koleo_loss(f) for f in features[: 2 * crops[0].shape[0]].chunk(2))  # per global view
        else:
            student_output, koleo = state.student(crops), torch.zeros((), device=state.device)
        dino = state.loss.forward_with_stats(student_output, teacher_output, epoch)
        loss = dino.loss + state.koleo_weight * koleo if state.koleo_weight else dino.loss

    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler is not None:
        state.scaler.scale(loss).backward()
        state.scaler.unscale_(state.optimizer)
    else:
        loss.backward()
    # a global clip is one divisor: fused optimisers divide by their grad_scale in their own pass over the gradients
    clip_in_optimizer = (
        state.scaler is None and state.skips_on_device and state.clip_grad > 0 and state.clip_grad_mode == "global"
    )
    if clip_in_optimizer:
        grad_norm = gradient_norm(state.trainable).to(loss.device)
    else:
        grad_norm = clip_gradients(state.trainable, state.clip_grad, state.clip_grad_mode).to(loss.device)
    cancel_gradients_last_layer(epoch, state.student_module, state.freeze_last_layer)

    bad_loss, bad_gradient = ~torch.isfinite(loss.detach()), ~torch.isfinite(grad_norm)
    local = torch.stack([dino.loss.detach(), koleo.detach(), bad_loss, bad_gradient]).float()
    dino_sum, koleo_sum, bad_losses, bad_gradients = all_reduce_sum(local).unbind()  # summed over processes
    update = (bad_losses == 0) & (bad_gradients == 0)
    if state.scaler is not None:  # overflowed gradients of a finite loss: the scaler skips the step and backs off
        skipped, backoff = bad_losses > 0, (bad_losses == 0) & (bad_gradients > 0)
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        skipped, backoff = ~update, torch.zeros_like(update)
        _optimizer_step(state, update, grad_norm if clip_in_optimizer else None)
    ema_update(state.teacher_params, state.student_params, (1.0 - schedule.momentum) * update.float())
    world = get_world_size()
    return StepStats(
        loss=dino_sum / world,
        koleo_loss=koleo_sum / world,
        grad_norm=grad_norm.float(),
        skipped=skipped.float(),
        scaler_backoff=backoff.float(),
        teacher_mean_entropy=dino.teacher_mean_entropy.float(),
        teacher_sample_entropy=dino.teacher_sample_entropy.float(),
    )


def _optimizer_step(state: DINOState, update: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
    """The optimiser's step where ``update`` (a 0-d bool device tensor) holds; with ``grad_norm``, the gradients are
    divided by :func:`clip_divisor` in the optimiser's own pass (a global clip)."""
    if state.skips_on_device:
        state.optimizer.found_inf = (~update).float()
        state.optimizer.grad_scale = None if grad_norm is None else clip_divisor(grad_norm, state.clip_grad)
        state.optimizer.step()
    elif bool(update):  # an optimiser that cannot skip from a device flag: one host synchronisation
        state.optimizer.step()


@dataclass(kw_only=True)
class EpochPlan:
    """Where one pass over the loader starts and what it may do besides training (built with keywords)."""

    epoch: int
    global_iter: int  # global iteration count when the pass starts
    start_iter: int = 0  # iterations of this epoch already done (a mid-epoch resume)
    max_iters: int | None = None  # stop once the global count reaches this
    checkpoint_every: int = 0  # call ``save`` every this many global iterations (0: never mid-epoch)
    print_freq: int = 10  # the host reads the steps' numbers (and honours stop signals) this often
    max_nonfinite: int = 10
    header: str = ""


@dataclass
class EpochResult:
    """``averages``: the epoch's means under official DINO's log names (``loss``, ``lr``, ``wd``; ``koleo`` when
    on) and counters (``epoch_time_s``, ``nonfinite_steps``, ``scaler_backoffs``, ``bad_images``)."""

    averages: dict[str, float]
    global_iter: int
    finished: bool  # the whole epoch was trained
    stop_signal: bool  # a stop was requested (signal): the checkpoint is saved, the caller exits
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
    ``save(epoch, iter_in_epoch, global_iter)`` is called every ``plan.checkpoint_every`` global iterations and when a
    stop is requested (on any process; honoured at the next reading of the steps, every ``plan.print_freq``). The
    pass ends early at ``plan.max_iters``. Per-iteration scalars go to TensorBoard under ``train/``.
    """
    niter = plan.start_iter + len(loader)
    end = niter if plan.max_iters is None else min(niter, plan.start_iter + plan.max_iters - plan.global_iter)
    meter = ProgressMeter(end, plan.header or f"Epoch {plan.epoch}", state.device, plan.print_freq, plan.start_iter)
    reader = _StepReader(state, meter, tb, collapse, state.loss.teacher_temp(plan.epoch), plan.max_nonfinite)
    global_iter, iteration, stopped = plan.global_iter, plan.start_iter, False
    for crops, _, n_skipped in loader:
        if iteration >= end:
            break
        schedule = StepSchedule(
            lr=float(schedules["lr"][global_iter]),
            weight_decay=float(schedules["wd"][global_iter]),
            momentum=float(schedules["momentum"][global_iter]),
        )
        stats = train_step(state, crops, plan.epoch, schedule)
        reader.add(global_iter, schedule, stats, crops[0].shape[0] * get_world_size(), n_skipped)
        global_iter += 1
        iteration += 1
        checkpoint_due = bool(plan.checkpoint_every) and global_iter % plan.checkpoint_every == 0
        if checkpoint_due or iteration % plan.print_freq == 0 or iteration >= end:
            reader.read()
            stopped = any_process_requested_stop(stop_request, state.device)
            if save is not None and (checkpoint_due or stopped):
                save(plan.epoch, iteration, global_iter)
            if stopped:
                break
    reader.read()
    averages = meter.averages()
    averages["epoch_time_s"] = meter.elapsed()
    averages["nonfinite_steps"] = float(state.nonfinite_steps)
    if state.scaler is not None:
        averages["scaler_backoffs"] = float(state.scaler_backoffs)
    averages["bad_images"] = float(reader.bad_images)
    return EpochResult(averages, global_iter, iteration >= niter, stopped, reader.bad_images)


def any_process_requested_stop(stop_request, device: torch.device) -> bool:
    """Whether a stop signal reached any process (a collective call: every process must make it)."""
    flag = torch.tensor([float(stop_request is not None and stop_request.requested)], device=device)
    return bool(all_reduce_sum(flag)[0] > 0)


class _StepReader:
    """Collects the steps' :class:`StepStats` and reads them all with one host synchronisation."""

    def __init__(self, state, meter, tb, collapse, teacher_temp: float, max_nonfinite: int):
        self.state, self.meter, self.tb, self.collapse = state, meter, tb, collapse
        self.teacher_temp, self.max_nonfinite = teacher_temp, max_nonfinite
        self.pending: list = []
        self.bad_images = 0

    def add(self, global_iter: int, schedule: StepSchedule, stats: StepStats, n_images: int, n_skipped) -> None:
        self.pending.append((global_iter, schedule, stats, n_images, n_skipped))

    def read(self) -> None:
        if not self.pending:
            return
        rows = torch.stack([torch.stack(stats) for _, _, stats, _, _ in self.pending]).tolist()
        for (global_iter, schedule, _, n_images, n_skipped), row in zip(self.pending, rows):
            stats = StepStats(*row)
            self._count(stats, global_iter)
            self.bad_images += int(n_skipped.sum())
            koleo = {"koleo": stats.koleo_loss} if self.state.koleo_weight else {}
            self.meter.update(n_images, loss=stats.loss, **koleo, lr=schedule.lr, wd=schedule.weight_decay)
            scalars = {
                **stats._asdict(),
                "lr": schedule.lr,
                "weight_decay": schedule.weight_decay,
                "teacher_momentum": schedule.momentum,
                "teacher_temp": self.teacher_temp,
                "images_per_s": self.meter.images_per_second(),
            }
            self.tb.scalars(scalars, global_iter, prefix="train/")
            if self.collapse is not None and not (stats.skipped or stats.scaler_backoff):
                self.collapse.update(stats._asdict())
        self.pending.clear()

    def _count(self, stats: StepStats, global_iter: int) -> None:
        state = self.state
        if stats.scaler_backoff:
            state.scaler_backoffs += 1
            return
        if not stats.skipped:
            state.consecutive_nonfinite = 0
            return
        state.nonfinite_steps += 1
        state.consecutive_nonfinite += 1
        if state.consecutive_nonfinite >= self.max_nonfinite:
            raise NonFiniteLossError(
                f"{state.consecutive_nonfinite} consecutive non-finite losses at iteration {global_iter}: stopping "
                f"(the last checkpoint is intact). {NONFINITE_ADVICE}"
            )


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
        message = f"warning: the teacher's output has been {kind[0]} for {self.patience} steps (collapse): {kind[1]}"
        log(message)
        return message
