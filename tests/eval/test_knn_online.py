"""The online k-NN of pretraining (``utils.eval.knn_online``): it classifies on the device it is given."""

import torch

from utils.eval import knn_online


def test_online_knn_classifies_on_the_given_device(monkeypatch):
    """``extract_features`` returns CPU tensors; the vote must run on the run's device (here the meta device,
    which any CPU-only machine has: a tensor left on the CPU shows up as device type ``cpu``)."""
    generator = torch.Generator().manual_seed(0)
    features = {"train": torch.randn(12, 4, generator=generator), "val": torch.randn(5, 4, generator=generator)}
    labels = {"train": torch.arange(12) % 3, "val": torch.arange(5) % 3}

    def fake_extract(backbone, dataset, device, batch_size, num_workers):
        return features[dataset], labels[dataset]

    seen = []

    def spy_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes):
        seen.append({t.device.type for t in (train_features, train_labels, test_features, test_labels)})
        return 50.0, 100.0

    monkeypatch.setattr(knn_online, "extract_features", fake_extract)
    monkeypatch.setattr(knn_online, "knn_classifier", spy_classifier)
    result = knn_online.evaluate_knn(None, "train", "val", torch.device("meta"), k=20)
    assert seen == [{"meta"}]
    assert result["top1"] == 50.0 and result["top5"] == 100.0
