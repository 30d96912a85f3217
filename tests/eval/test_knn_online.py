"""The online k-NN of pretraining (``utils.eval.knn_online``): every process extracts features (a collective call),
the main process alone classifies, on the run's device."""

import pytest
import torch

from utils.eval import knn_online
from utils.runtime.distributed import DistributedContext


def _context(rank: int) -> DistributedContext:
    """Process ``rank`` of two, training on the meta device (which any CPU-only machine has: a tensor left on the CPU
    shows up as device type ``cpu``)."""
    return DistributedContext(rank=rank, world_size=2, local_rank=rank, device=torch.device("meta"))


@pytest.fixture
def spies(monkeypatch):
    """Fake features (CPU tensors, as ``extract_features`` returns) and a record of every call the evaluation makes:
    ``extract`` (the datasets embedded), ``classify`` (the device types the vote saw), ``rank`` (rank computations)."""
    generator = torch.Generator().manual_seed(0)
    features = {"train": torch.randn(12, 4, generator=generator), "val": torch.randn(5, 4, generator=generator)}
    labels = {"train": torch.arange(12) % 3, "val": torch.arange(5) % 3}
    calls = {"extract": [], "classify": [], "rank": 0}

    def fake_extract(backbone, dataset, device, batch_size, num_workers):
        calls["extract"].append(dataset)
        return features[dataset], labels[dataset]

    def spy_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes):
        calls["classify"].append({t.device.type for t in (train_features, train_labels, test_features, test_labels)})
        return 50.0, 100.0

    def spy_rank(train_features):
        calls["rank"] += 1
        return 3.5

    monkeypatch.setattr(knn_online, "extract_features", fake_extract)
    monkeypatch.setattr(knn_online, "knn_classifier", spy_classifier)
    monkeypatch.setattr(knn_online, "effective_rank", spy_rank)
    return calls


def test_online_knn_classifies_on_the_main_process_on_the_run_device(spies):
    result = knn_online.evaluate_knn(None, "train", "val", _context(rank=0), k=20)
    assert spies["extract"] == ["train", "val"]
    assert spies["classify"] == [{"meta"}]
    assert spies["rank"] == 1
    assert result == {"top1": 50.0, "top5": 100.0, "feature_rank": 3.5}


def test_online_knn_extracts_but_does_not_classify_on_other_processes(spies):
    """Feature extraction gathers over all processes, so rank 1 takes part in it; the vote and the feature rank are
    the main process's work alone, and rank 1 gets None."""
    result = knn_online.evaluate_knn(None, "train", "val", _context(rank=1), k=20)
    assert spies["extract"] == ["train", "val"]
    assert spies["classify"] == [] and spies["rank"] == 0
    assert result is None
