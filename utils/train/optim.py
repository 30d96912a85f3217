"""Optimisation pieces: parameter groups, the optimiser, AMP, gradient clipping, the teacher's EMA."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn


def get_params_groups(model: nn.Module) -> list[dict]:
    """Two groups: weights that get weight decay, and biases / norm parameters (any 1-D tensor) that do not.

    Frozen parameters (``requires_grad=False``) are left out. The first group is the regularised one, so that the
    weight-decay schedule can set ``param_groups[0]["weight_decay"]``.
    """
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or param.ndim <= 1 else regularized).append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def build_optimizer(name: str, param_groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW (default) or SGD with momentum 0.9, fused kernels where supported (they skip a step from a device flag,
    ``found_inf``); lr and weight decay are set per step."""
    params = [p for g in param_groups for p in g["params"]]
    fused = all(p.device.type in ("cuda", "cpu") for p in params) and len(params) > 0
    if name == "adamw":
        try:
            return torch.optim.AdamW(param_groups, lr=0.0, fused=fused)
        except (RuntimeError, TypeError):
            return torch.optim.AdamW(param_groups, lr=0.0, foreach=True)
    if name == "sgd":
        try:
            return torch.optim.SGD(param_groups, lr=0.0, momentum=0.9, fused=fused)
        except (RuntimeError, TypeError):
            return torch.optim.SGD(param_groups, lr=0.0, momentum=0.9, foreach=True)
    raise ValueError(f"unknown --optimizer {name!r}: use adamw or sgd")


def set_schedule_values(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Every group gets ``lr``; the first (regularised) group gets ``weight_decay``."""
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if i == 0:
            group["weight_decay"] = weight_decay


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → ``bf16`` on CUDA devices of compute capability 8.0 and above (Ampere: A100, RTX 30xx, and later),
    ``fp16`` with a GradScaler on older ones (V100 7.0, T4 7.5: no bf16 units; PyTorch's ``is_bf16_supported``
    counts their emulation), ``fp32`` on the CPU (bf16 autocast is slower on CPUs without bf16 units)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return "bf16" if major >= 8 else "fp16"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for ``precision`` in {fp32, fp16, bf16} on ``device`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (loss scaling against underflow), None otherwise."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


#: ``--clip_grad_mode`` choices: ``param`` clips each parameter's gradient norm (official DINO), ``global`` their
#: joint norm (``torch.nn.utils.clip_grad_norm_``).
CLIP_MODES = ("param", "global")


@torch.no_grad()
def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: float, mode: str = "param") -> torch.Tensor:
    """Clip the gradients to ``max_norm`` (0 = no clipping); returns their global L2 norm before clipping (0-d).

    ``mode="param"``: each parameter's gradient on its own, as official DINO's ``utils.clip_gradients``: multiplied by
    ``max_norm / (norm + 1e-6)`` where that is below 1. ``mode="global"``: all gradients by one factor, so that their
    joint norm is at most ``max_norm``. Foreach kernels over the tensors; no host synchronisation.
    """
    if mode not in CLIP_MODES:
        raise ValueError(f"unknown clip mode {mode!r}: use {' or '.join(CLIP_MODES)}")
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm <= 0:
        return total
    if mode == "global":
        torch._foreach_mul_(grads, torch.clamp_max(max_norm / (total + 1e-6), 1.0))
        return total
    coefficients = torch.clamp_max(max_norm / (torch.stack(norms) + 1e-6), 1.0)
    torch._foreach_mul_(grads, list(coefficients.unbind()))
    return total


def gradient_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients (a 0-d device tensor; 0 when none has a gradient)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def clip_divisor(grad_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What to divide the gradients by to clip their global norm ``grad_norm`` to ``max_norm``: ``max(1, (norm +
    1e-6) / max_norm)``, the reciprocal of ``clip_grad_norm_``'s factor. Fused optimisers take it as ``grad_scale`` and
    divide in their own pass over the gradients (no separate scaling pass)."""
    return torch.clamp_min((grad_norm + 1e-6) / max_norm, 1.0)


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """During the first ``freeze_last_layer`` epochs the head's last layer is not updated (DINO's trick)."""
    if epoch >= freeze_last_layer:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


@torch.no_grad()
def ema_update(
    teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], student_weight: float | torch.Tensor
) -> None:
    """``teacher = (1 - w) * teacher + w * student`` for every pair (``w = 1 - momentum``), in one foreach call.

    ``student_weight`` may be a 0-d device tensor (0: no EMA step): it is passed as a list of tensor weights, the
    overload that reads it on the device (a single tensor would match the number overload, which reads it on the
    host)."""
    if isinstance(student_weight, torch.Tensor):
        torch._foreach_lerp_(teacher_params, student_params, [student_weight] * len(teacher_params))
    else:
        torch._foreach_lerp_(teacher_params, student_params, student_weight)
