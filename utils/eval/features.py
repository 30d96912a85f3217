"""Frozen features of a ViT: which tokens (:class:`TokenFeatures`), their extraction split across processes and
gathered back in dataset order, their dump files, and their effective rank."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.runtime.checkpoint import load_checkpoint
from utils.runtime.distributed import all_gather_uneven, get_rank, get_world_size
from utils.runtime.errors import DatasetError


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


@dataclass(frozen=True)
class TokenFeatures:
    """Which frozen feature of a ViT to use: ``feature_fn(model, images [B, 3, H, W]) -> [B, dim]``.

    Reads the last ``n_last_blocks`` blocks' outputs (each through the final norm) with the backbone's
    ``get_intermediate_layers`` and concatenates, oldest block first, per block the CLS token (``use_cls``) or the
    mean of its patch tokens (prefix tokens excluded); with ``avgpool_patchtokens`` the mean patch token of the last
    block is appended. ``dim = (n_last_blocks + avgpool_patchtokens) * embed_dim``.

    Official DINO's linear probe (``--n_last_blocks n --avgpool_patchtokens b``) is ``TokenFeatures(n, True, b)``;
    its k-NN feature (the backbone's output, the last block's normalised CLS token) is ``TokenFeatures()``.
    """

    n_last_blocks: int = 1
    use_cls: bool = True
    avgpool_patchtokens: bool = False

    def __post_init__(self) -> None:
        if self.n_last_blocks < 1:
            raise ValueError(f"n_last_blocks must be >= 1, got {self.n_last_blocks}")

    def __call__(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        blocks = model.get_intermediate_layers(images, self.n_last_blocks)
        prefix = model.num_prefix_tokens
        parts = [tokens[:, 0] if self.use_cls else tokens[:, prefix:].mean(dim=1) for tokens in blocks]
        if self.avgpool_patchtokens:
            parts.append(blocks[-1][:, prefix:].mean(dim=1))
        return torch.cat(parts, dim=-1)

    def dim(self, embed_dim: int) -> int:
        """Feature size for a backbone of width ``embed_dim``."""
        return (self.n_last_blocks + int(self.avgpool_patchtokens)) * embed_dim

    def describe(self) -> str:
        """Short name: ``CLS``, ``mean patch``, ``CLS x4 blocks``, ``CLS x4 blocks + mean patch``."""
        name = "CLS" if self.use_cls else "mean patch"
        name = name if self.n_last_blocks == 1 else f"{name} x{self.n_last_blocks} blocks"
        return f"{name} + mean patch" if self.avgpool_patchtokens else name


#: ``eval_knn.py --feature`` choices.
KNN_FEATURES = {"cls": TokenFeatures(), "patch_mean": TokenFeatures(use_cls=False)}


@dataclass
class FeatureDump:
    """Features ``[N, D]`` / ``[M, D]`` and labels ``[N]`` / ``[M]`` of a train and a test split, saved as the four
    files of official DINO's ``eval_knn.py --dump_features`` (:data:`FILES`, one tensor each)."""

    FILES: ClassVar[dict[str, str]] = {
        "train_features": "trainfeat.pth",
        "test_features": "testfeat.pth",
        "train_labels": "trainlabels.pth",
        "test_labels": "testlabels.pth",
    }

    train_features: torch.Tensor
    train_labels: torch.Tensor
    test_features: torch.Tensor
    test_labels: torch.Tensor

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for field_name, file_name in self.FILES.items():
            torch.save(getattr(self, field_name).cpu(), folder / file_name)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> FeatureDump:
        """The four files of ``folder`` (loaded with ``weights_only=True``); features as fp32, labels as int64."""
        tensors = {}
        for field_name, file_name in cls.FILES.items():
            tensor = load_checkpoint(Path(folder) / file_name)
            if not isinstance(tensor, torch.Tensor):
                raise DatasetError(f"{Path(folder) / file_name} holds a {type(tensor).__name__}, not a tensor")
            tensors[field_name] = tensor.float() if field_name.endswith("features") else tensor.long()
        return cls(**tensors)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    batch_size: int = 128,
    num_workers: int = 2,
    feature_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] = TokenFeatures(),
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every sample of ``dataset``, in dataset order, on every process.

    Each process embeds the samples ``rank::world_size`` (each image once, by one process), then all processes
    gather the pieces (uneven sizes handled) and put them back in order. Returns ``features [N, C]`` (fp32, on the
    CPU) and ``labels [N]`` (int64). ``feature_fn(model, images) -> [B, C]`` chooses the feature (default: the
    last block's CLS token, see :class:`TokenFeatures`); it runs under ``autocast_dtype`` autocast when given.
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
