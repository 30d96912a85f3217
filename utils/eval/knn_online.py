"""k-NN evaluation of a backbone during pretraining: extract frozen features of two splits, then vote."""

from __future__ import annotations

from torch import nn
from torch.utils.data import Dataset

from utils.eval.features import effective_rank, extract_features
from utils.eval.knn import knn_classifier
from utils.runtime.distributed import DistributedContext


def evaluate_knn(
    backbone: nn.Module,
    train_dataset: Dataset,
    val_dataset: Dataset,
    ctx: DistributedContext,
    batch_size: int = 128,
    num_workers: int = 2,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float] | None:
    """Weighted k-NN (cosine, ``k`` neighbours, votes ``exp(sim / temperature)``) of ``backbone``'s CLS features:
    the train split is the memory bank, the val split is classified.

    A collective call: every process embeds its share of both splits on ``ctx.device`` and receives all features;
    the main process alone then classifies, on ``ctx.device``, and returns ``{"top1": %, "top5": %,
    "feature_rank": r}``, ``r`` the :func:`~utils.eval.features.effective_rank` of the train features (of
    ``embed_dim`` at most): a rank that falls to a few units while the accuracy drops is dimensional collapse.
    Every other process returns None."""
    device = ctx.device
    train_features, train_labels = extract_features(backbone, train_dataset, device, batch_size, num_workers)
    val_features, val_labels = extract_features(backbone, val_dataset, device, batch_size, num_workers)
    if not ctx.is_main:
        return None
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    top1, top5 = knn_classifier(
        train_features.to(device),
        train_labels.to(device),
        val_features.to(device),
        val_labels.to(device),
        min(k, len(train_labels)),
        temperature,
        num_classes,
    )
    return {"top1": top1, "top5": top5, "feature_rank": effective_rank(train_features)}
