"""Linear probing of a frozen backbone: the features it is trained on, the classifiers, training and evaluation."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def linear_features(model: nn.Module, images: torch.Tensor, n_last_blocks: int = 4, avgpool: bool = False):
    """DINO's linear-probe features ``[B, n * C]`` (or ``[B, (n + 1) * C]`` with ``avgpool``): the CLS tokens of the
    last ``n_last_blocks`` blocks, concatenated, then the mean of the last block's patch tokens if ``avgpool``.
    (The official code breaks when ``n > 1`` is combined with ``avgpool``; both combinations work here.)"""
    layers = model.get_intermediate_layers(images, n_last_blocks)
    parts = [tokens[:, 0] for tokens in layers]
    if avgpool:
        parts.append(layers[-1][:, model.num_prefix_tokens :].mean(dim=1))
    return torch.cat(parts, dim=-1)


def make_linear_feature_fn(n_last_blocks: int, avgpool: bool) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """``feature_fn(model, images)`` for :func:`utils.eval.features.extract_features` (picklable arguments only)."""

    def feature_fn(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return linear_features(model, images, n_last_blocks, avgpool)

    return feature_fn


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

    Features are ``[N, D]`` tensors (their device is used). SGD (momentum 0.9) or Adam(W) with a cosine decay of
    each head's lr to 0; lr scaled by ``batch_size / 256`` for SGD (the official rule). Returns per-head validation
    top-1/top-5 (%), the best head's index, lr and accuracies, and the trained grid.
    """
    device = train_features.device
    generator = torch.Generator().manual_seed(seed)
    grid = LinearClassifierGrid(train_features.shape[1], num_classes, len(lrs)).to(device)
    scale = batch_size / 256.0 if optimizer_name == "sgd" else 1.0
    base_lrs = [lr * scale for lr in lrs]
    optimizer = _grid_optimizer(grid, base_lrs, optimizer_name, weight_decay)
    steps_per_epoch = max(1, -(-train_features.shape[0] // batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    history = []
    for epoch in range(epochs):
        order = torch.randperm(train_features.shape[0], generator=generator).to(device)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = grid_loss(grid(train_features[idx]), train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() / len(lrs)
        metrics = evaluate_grid(grid, val_features, val_labels)
        metrics["train_loss"] = total / steps_per_epoch
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


def linear_optimizer(params, name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 (official), or Adam / AdamW (the original notebook)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: use sgd, adam or adamw")


def classify_batch(
    backbone: nn.Module, classifier: nn.Module, images: torch.Tensor, n_last_blocks: int, avgpool: bool
) -> torch.Tensor:
    """Logits of the classifier on the frozen backbone's features (no gradient through the backbone)."""
    with torch.no_grad():
        features = linear_features(backbone, images, n_last_blocks, avgpool)
    return classifier(features)
