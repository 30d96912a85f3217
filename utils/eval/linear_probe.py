"""Linear probing of frozen features: the classifiers, the one trainer (:func:`train_epoch` with the per-epoch cosine
lr of :func:`cosine_lr`) that both ``eval_linear.py`` paths use, and top-k evaluation.

The features are chosen by :class:`utils.eval.features.TokenFeatures`. A probe is a :class:`LinearClassifierGrid` of
``L >= 1`` heads (one per learning rate of a sweep, ``L = 1`` for the official path), each its own parameter group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


class LinearClassifier(nn.Module):
    """One linear layer on frozen features: ``[B, dim]`` → ``[B, num_labels]`` (weights N(0, 0.01), zero bias)."""

    def __init__(self, dim: int, num_labels: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_labels)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class LinearClassifierGrid(nn.Module):
    """``L`` independent linear classifiers evaluated in one batched matmul: ``[B, dim]`` → ``[L, B, num_labels]``.

    Each head has its own parameter tensors (so that each can have its own learning rate); the forward stacks them
    and runs one ``baddbmm``. Used to sweep ``L`` learning rates over cached features in a single pass over the data.
    """

    def __init__(self, dim: int, num_labels: int, n_heads: int):
        super().__init__()
        self.heads = nn.ModuleList(LinearClassifier(dim, num_labels) for _ in range(n_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.stack([h.linear.weight for h in self.heads]).transpose(1, 2)  # [L, dim, C]
        bias = torch.stack([h.linear.bias for h in self.heads]).unsqueeze(1)  # [L, 1, C]
        return torch.baddbmm(bias, x.unsqueeze(0).expand(len(self.heads), -1, -1), weight)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Number of samples whose label is among the top-k logits, for each k (k capped at the number of classes).
    ``logits [..., B, C]``, ``labels [B]`` → one ``[...]`` count tensor per k."""
    kmax = min(max(ks), logits.shape[-1])
    top = logits.topk(kmax, dim=-1).indices
    hits = top == labels.unsqueeze(-1)
    return [hits[..., : min(k, kmax)].any(dim=-1).sum(dim=-1) for k in ks]


def grid_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over heads of each head's mean cross-entropy: ``[L, B, C]`` logits, ``[B]`` labels → scalar.
    (Summing keeps each head's gradient equal to that of its own loss.)"""
    n_heads, batch, classes = logits.shape
    per_sample = F.cross_entropy(logits.reshape(-1, classes), labels.repeat(n_heads), reduction="none")
    return per_sample.view(n_heads, batch).mean(dim=1).sum()


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """Learning rate of epoch ``epoch`` (0-based) of an ``epochs``-epoch cosine decay to 0:
    ``base_lr * (1 + cos(pi * epoch / epochs)) / 2`` (``CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped once
    per epoch, as official DINO's ``eval_linear.py``). A function of the epoch only: a run resumed with more epochs
    follows the longer schedule."""
    return base_lr * (1.0 + math.cos(math.pi * epoch / epochs)) / 2.0


def set_epoch_lrs(optimizer: torch.optim.Optimizer, base_lrs: list[float], epoch: int, epochs: int) -> None:
    """Parameter group ``i`` (head ``i``) gets :func:`cosine_lr` of ``base_lrs[i]``."""
    for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = cosine_lr(base_lr, epoch, epochs)


def train_epoch(
    classifier: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """One pass of the linear-probe trainer: for each ``(features [B, D], labels [B])`` batch, one
    ``optimizer.step(closure)`` on the objective :func:`grid_loss` of ``classifier`` (a :class:`LinearClassifierGrid`,
    possibly DDP-wrapped) plus ``penalty()`` when given. SGD and Adam(W) evaluate the closure once per step; L-BFGS
    (full-batch, one batch) as often as its line search needs.

    ``on_step(step, loss)`` gets the 1-based step and the objective at the start of the step divided by the number
    of heads (a 0-d device tensor: nothing is read back to the host here). Returns the mean of that value over the
    epoch's steps, a 0-d device tensor (0 for no batch)."""
    grid = classifier.module if hasattr(classifier, "module") else classifier
    n_heads = len(grid.heads)
    total, steps = None, 0
    for features, labels in batches:
        objective = optimizer.step(_closure(classifier, optimizer, features, labels, penalty))
        steps += 1
        head_mean = objective.detach() / n_heads
        total = head_mean if total is None else total + head_mean
        if on_step is not None:
            on_step(steps, head_mean)
    if total is None:
        return torch.zeros((), device=grid.heads[0].linear.weight.device)
    return total / steps


def _closure(
    classifier: nn.Module,
    optimizer: torch.optim.Optimizer,
    features: torch.Tensor,
    labels: torch.Tensor,
    penalty: Callable[[], torch.Tensor] | None,
) -> Callable[[], torch.Tensor]:
    """The objective of one batch with its gradients, as ``optimizer.step`` wants it."""

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        objective = grid_loss(classifier(features), labels)
        if penalty is not None:
            objective = objective + penalty()
        objective.backward()
        return objective

    return closure


def build_grid(
    dim: int, num_classes: int, lrs: list[float], optimizer_name: str, weight_decay: float, device: torch.device
) -> tuple[LinearClassifierGrid, torch.optim.Optimizer]:
    """``len(lrs)`` linear heads on ``dim`` features and their optimizer, one parameter group per head."""
    grid = LinearClassifierGrid(dim, num_classes, len(lrs)).to(device)
    return grid, _grid_optimizer(grid, lrs, optimizer_name, weight_decay)


def scaled_lr(lr: float, global_batch: int, optimizer_name: str) -> float:
    """SGD: ``lr * global_batch / 256`` (official linear scaling rule); Adam(W): ``lr`` as given."""
    return lr * global_batch / 256.0 if optimizer_name == "sgd" else lr


def train_grid_on_features(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    lrs: list[float],
    epochs: int,
    num_classes: int,
    batch_size: int = 256,
    optimizer_name: str = "sgd",
    weight_decay: float = 0.0,
    seed: int = 0,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train one linear classifier per learning rate on cached features, all in the same pass over the data.

    Features are ``[N, D]`` tensors (their device is used). The trainer of :func:`train_epoch` with SGD (momentum
    0.9) or Adam(W), each head's lr (scaled by :func:`scaled_lr`) decayed per epoch by :func:`cosine_lr`; batches
    are a seeded shuffle of the cached rows. Returns per-head validation top-1/top-5 (%), the best head's index, lr
    and accuracies, the per-epoch metrics and the trained grid.
    """
    device = train_features.device
    generator = torch.Generator().manual_seed(seed)
    base_lrs = [scaled_lr(lr, batch_size, optimizer_name) for lr in lrs]
    grid, optimizer = build_grid(train_features.shape[1], num_classes, base_lrs, optimizer_name, weight_decay, device)
    history = []
    for epoch in range(epochs):
        set_epoch_lrs(optimizer, base_lrs, epoch, epochs)
        order = torch.randperm(train_features.shape[0], generator=generator).to(device)
        batches = ((train_features[idx], train_labels[idx]) for idx in order.split(batch_size))
        train_loss = train_epoch(grid, optimizer, batches)
        metrics = evaluate_grid(grid, val_features, val_labels)
        metrics["train_loss"] = train_loss.item()
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    final = history[-1]
    best = int(torch.tensor(final["top1"]).argmax())
    return {
        "lrs": lrs,
        "top1": final["top1"],
        "top5": final["top5"],
        "best_index": best,
        "best_lr": lrs[best],
        "best_top1": final["top1"][best],
        "best_top5": final["top5"][best],
        "grid": grid,
        "history": history,
    }


def _grid_optimizer(grid: LinearClassifierGrid, lrs: list[float], name: str, weight_decay: float):
    """One parameter group per head, each with its own learning rate."""
    groups = [{"params": list(head.parameters()), "lr": lr} for head, lr in zip(grid.heads, lrs)]
    if name == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: use sgd, adam or adamw")


@torch.no_grad()
def evaluate_grid(grid: LinearClassifierGrid, features: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024):
    """Top-1 and top-5 accuracy (%) of every head on ``features``; lists of length ``L``."""
    correct1 = torch.zeros(len(grid.heads), device=features.device)
    correct5 = torch.zeros_like(correct1)
    for start in range(0, features.shape[0], batch_size):
        c1, c5 = topk_correct(grid(features[start : start + batch_size]), labels[start : start + batch_size])
        correct1 += c1
        correct5 += c5
    n = max(features.shape[0], 1)
    return {"top1": (100.0 * correct1 / n).tolist(), "top5": (100.0 * correct5 / n).tolist()}
