"""The official DINO training step's structure, kept as a plain reference: what tinydino's lean step is measured and
tested against (``benchmarks/bench_train_step.py``, ``tests/train/test_training_step.py``).

Per-pair Python loop in the loss, PyTorch's default (per-tensor, non-fused) AdamW, one host synchronisation per step
to check the loss, a Python loop over parameters for the EMA, and the head's last layer as the official code builds
it (``torch.nn.utils.weight_norm`` on a bias-free ``nn.Linear``: see :func:`use_official_last_layer`), and official
DINO's gradient clipping (:func:`official_clip_gradients`: each parameter's gradient norm on its own).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from utils.model.vit import WeightNormLinear
from utils.train.optim import cancel_gradients_last_layer, set_schedule_values


def official_last_layer(layer: WeightNormLinear) -> nn.Linear:
    """The official DINO head's last layer with ``layer``'s weights: ``nn.utils.weight_norm`` on a bias-free
    ``nn.Linear`` (PyTorch's own weight-norm kernels; the same ``weight_g``/``weight_v`` parameters and keys)."""
    out_dim, in_dim = layer.weight_v.shape
    linear = nn.Linear(in_dim, out_dim, bias=False, device=layer.weight_v.device, dtype=layer.weight_v.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of parametrizations, as DINO uses it
        linear = nn.utils.weight_norm(linear)
    with torch.no_grad():
        linear.weight_g.copy_(layer.weight_g)
        linear.weight_v.copy_(layer.weight_v)
    linear.weight_g.requires_grad_(layer.weight_g.requires_grad)
    linear.weight_v.requires_grad_(layer.weight_v.requires_grad)
    return linear


def use_official_last_layer(model: nn.Module) -> nn.Module:
    """Replace (in place) every :class:`WeightNormLinear` of ``model`` by :func:`official_last_layer`; returns it."""
    for name, child in list(model.named_children()):
        if isinstance(child, WeightNormLinear):
            setattr(model, name, official_last_layer(child))
        else:
            use_official_last_layer(child)
    return model


def looped_dino_loss(loss_module, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int):
    """DINO's loss as the official code writes it: a loop over (teacher view, student view) pairs."""
    student_out = (student_output / loss_module.student_temp).chunk(loss_module.ncrops)
    temp = loss_module.teacher_temp(epoch)
    teacher_out = F.softmax((teacher_output - loss_module.center) / temp, dim=-1).detach().chunk(2)
    total, n_terms = 0.0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            n_terms += 1
    loss_module.update_center(teacher_output)
    return total / n_terms


def reference_train_step(
    student: nn.Module,
    teacher: nn.Module,
    loss_module,
    optimizer,
    crops,
    epoch: int,
    lr: float,
    weight_decay: float,
    momentum: float,
    clip_grad: float,
    freeze_last_layer: int,
):
    """One step in the official structure; returns the loss as a Python float (the per-step synchronisation)."""
    set_schedule_values(optimizer, lr, weight_decay)
    teacher_output = teacher(crops[:2])
    student_output = student(crops)
    loss = looped_dino_loss(loss_module, student_output, teacher_output, epoch)
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"loss is {loss_value}")
    optimizer.zero_grad()
    loss.backward()
    if clip_grad:
        official_clip_gradients(student.parameters(), clip_grad)
    cancel_gradients_last_layer(epoch, student, freeze_last_layer)
    optimizer.step()
    with torch.no_grad():
        for param_q, param_k in zip(student.parameters(), teacher.parameters()):
            param_k.data.mul_(momentum).add_((1 - momentum) * param_q.detach().data)
    return loss_value


def official_clip_gradients(parameters: Iterable[torch.Tensor], clip: float) -> list[float]:
    """Official DINO's ``utils.clip_gradients`` on a model's ``parameters()``: each gradient's L2 norm clipped to
    ``clip`` on its own (scaled by ``clip / (norm + 1e-6)`` where that is below 1; a host synchronisation per
    parameter); returns the norms before clipping, of the parameters that have a gradient."""
    norms = []
    for p in parameters:
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def reference_optimizer(param_groups) -> torch.optim.Optimizer:
    """PyTorch's default AdamW on the CPU: a Python loop over tensors (no foreach, no fused kernel)."""
    return torch.optim.AdamW(param_groups, lr=0.0, foreach=False, fused=False)
