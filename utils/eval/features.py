"""Frozen-feature extraction, split across processes and gathered back in dataset order."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.runtime.distributed import all_gather_uneven, get_rank, get_world_size


class StridedSampler(Sampler[int]):
    """Indices ``rank, rank + world, rank + 2 * world, ...``: every sample once, on one process, no padding."""

    def __init__(self, dataset_len: int, rank: int, world_size: int):
        self.indices = range(rank, dataset_len, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class IndexedDataset(Dataset):
    """Wraps a dataset so that each item also returns its index: ``(image, label, index)``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, label, index


def pool_output(output: torch.Tensor) -> torch.Tensor:
    """A backbone's output as one vector per image: ``[B, C]`` as is, the spatial mean of ``[B, C, H, W]`` maps
    (convolutional backbones), the first (CLS) token of ``[B, T, C]`` token sequences."""
    if output.ndim == 4:
        return output.mean(dim=(2, 3))
    if output.ndim == 3:
        return output[:, 0]
    return output


def cls_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The backbone's output pooled to ``[B, C]``: for our ViTs, timm's normalised CLS token."""
    return pool_output(model(images))


def patch_mean_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Mean of the last block's normalised patch tokens ``[B, C]`` (prefix tokens excluded)."""
    tokens = model.get_intermediate_layers(images, n=1)[0]
    return tokens[:, model.num_prefix_tokens :].mean(dim=1)


FEATURES = {"cls": cls_features, "patch_mean": patch_mean_features}


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    batch_size: int = 128,
    num_workers: int = 2,
    feature_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] = cls_features,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every sample of ``dataset``, in dataset order, on every process.

    Each process embeds the samples ``rank::world_size`` (each image once, by one process), then all processes
    gather the pieces (uneven sizes handled) and put them back in order. Returns ``features [N, C]`` (fp32, on the
    CPU) and ``labels [N]`` (int64). ``feature_fn(model, images) -> [B, C]`` chooses the feature.
    """
    rank, world = get_rank(), get_world_size()
    loader = DataLoader(
        IndexedDataset(dataset),
        batch_size=batch_size,
        sampler=StridedSampler(len(dataset), rank, world),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0),  # evaluating must not consume the training run's global RNG
    )
    was_training = model.training
    model.eval()
    feats, labels, indices = [], [], []
    for images, target, index in loader:
        images = images.to(device, non_blocking=True)
        if autocast_dtype is not None:
            with torch.autocast(device.type, dtype=autocast_dtype):
                out = feature_fn(model, images)
        else:
            out = feature_fn(model, images)
        feats.append(out.float())
        labels.append(torch.as_tensor(target).to(device))
        indices.append(index.to(device))
    model.train(was_training)
    dim = feats[0].shape[1] if feats else _feature_dim(model, dataset, device, feature_fn)
    local_feats = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)
    local_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    local_index = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long, device=device)
    all_index = torch.cat(all_gather_uneven(local_index))
    features = torch.empty(len(dataset), dim, dtype=torch.float32)
    all_labels = torch.empty(len(dataset), dtype=torch.long)
    features[all_index.cpu()] = torch.cat(all_gather_uneven(local_feats)).cpu()
    all_labels[all_index.cpu()] = torch.cat(all_gather_uneven(local_labels.long())).cpu()
    return features, all_labels


def _feature_dim(model: nn.Module, dataset: Dataset, device: torch.device, feature_fn: Callable) -> int:
    """Feature size, for a process that got no sample (more processes than samples)."""
    image = dataset[0][0].unsqueeze(0).to(device)
    return feature_fn(model, image).shape[1]


def effective_rank(features: torch.Tensor, chunk_rows: int = 65536) -> float:
    """Effective rank of a feature matrix ``[N, D]``: ``exp(H)`` with ``H`` the entropy of the normalised spectrum
    ``p_i = s_i^2 / sum_j s_j^2`` of the centred features (``s`` the singular values). Between 1 (every sample on
    one line) and ``min(N - 1, D)`` (variance spread evenly over that many directions): a dimensional-collapse
    indicator, as in Roy & Vetterli (2007). The ``s_i^2`` are the eigenvalues of the ``[D, D]`` scatter matrix,
    accumulated in float64 over ``chunk_rows`` rows at a time (no copy of the whole matrix, so 1.28 M x 768 features
    are fine); 0 for fewer than 2 rows or constant features."""
    if features.shape[0] < 2:
        return 0.0
    mean = features.mean(dim=0, dtype=torch.float64)
    scatter = features.new_zeros(features.shape[1], features.shape[1], dtype=torch.float64)
    for start in range(0, features.shape[0], chunk_rows):
        centred = features[start : start + chunk_rows].double() - mean
        scatter.addmm_(centred.T, centred)
    power = torch.linalg.eigvalsh(scatter).clamp_min(0)
    total = power.sum()
    if not torch.isfinite(total) or total <= 0:  # identical rows centre to exact zeros
        return 0.0
    p = power / total
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum()
    return float(torch.exp(entropy))
