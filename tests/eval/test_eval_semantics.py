"""The evaluations' DINO semantics against independent references: the official weighted k-NN classifier written
out here (``eval_knn.knn_classifier`` of facebookresearch/dino), hand-computed votes, and the linear probe's
features against a ViT forward written out block by block."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import eval_linear
from utils.eval.knn import knn_classifier, knn_predict
from utils.model.vit import build_backbone


def official_knn(train_features, train_labels, test_features, test_labels, k, T, num_classes):
    """Official ``knn_classifier`` (one chunk): returns (top1 %, top5 %, class scores ``[M, C]``)."""
    train_features = F.normalize(train_features, dim=1)
    test_features = F.normalize(test_features, dim=1)
    similarity = torch.mm(test_features, train_features.t())
    distances, indices = similarity.topk(k, largest=True, sorted=True)
    candidates = train_labels.view(1, -1).expand(test_features.shape[0], -1)
    retrieved_neighbors = torch.gather(candidates, 1, indices)
    retrieval_one_hot = torch.zeros(test_features.shape[0] * k, num_classes, dtype=train_features.dtype)
    retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
    distances_transform = distances.clone().div_(T).exp_()
    probs = torch.sum(
        torch.mul(retrieval_one_hot.view(test_features.shape[0], -1, num_classes), distances_transform.view(-1, k, 1)),
        1,
    )
    _, predictions = probs.sort(1, True)
    correct = predictions.eq(test_labels.view(-1, 1))
    top1 = correct.narrow(1, 0, 1).sum().item()
    top5 = correct.narrow(1, 0, min(5, k)).sum().item()
    n = test_features.shape[0]
    return top1 * 100.0 / n, top5 * 100.0 / n, probs


def random_problem(seed=0, n_train=80, n_test=30, dim=6, num_classes=9):
    generator = torch.Generator().manual_seed(seed)
    train = torch.randn(n_train, dim, generator=generator, dtype=torch.float64)
    test = torch.randn(n_test, dim, generator=generator, dtype=torch.float64)
    train_labels = torch.randint(0, num_classes, (n_train,), generator=generator)
    test_labels = torch.randint(0, num_classes, (n_test,), generator=generator)
    return train, train_labels, test, test_labels, num_classes


@pytest.mark.parametrize("k, T", [(10, 0.07), (20, 0.5)])
def test_knn_scores_are_the_official_weighted_votes(k, T):
    """Class scores proportional (per test sample) to the official ``sum exp(sim / T)`` votes, same accuracies."""
    train, train_labels, test, test_labels, num_classes = random_problem()
    _, scores = knn_predict(train, train_labels, test, k, num_classes, T)
    top1, top5, probs = official_knn(train, train_labels, test, test_labels, k, T, num_classes)
    torch.testing.assert_close(scores / scores.sum(1, keepdim=True), probs / probs.sum(1, keepdim=True))
    assert knn_classifier(train, train_labels, test, test_labels, k, T, num_classes) == pytest.approx((top1, top5))


def unit(cos_with_e0: float, axis: int, dim: int = 8) -> torch.Tensor:
    """A unit vector with cosine ``cos_with_e0`` to e0, the rest along ``axis``."""
    v = torch.zeros(dim, dtype=torch.float64)
    v[0], v[axis] = cos_with_e0, math.sqrt(1 - cos_with_e0**2)
    return v


def test_knn_temperature_decides_a_hand_computed_vote():
    """One neighbour of class 0 at cosine 0.9, three of class 1 at cosine 0.8. Weights ``exp(s / T)``:
    T = 0.07: class 0 scores e^(0.9/0.07), class 1 3 e^(0.8/0.07), ratio e^(0.1/0.07) / 3 = 1.39 -> class 0;
    T = 0.14: ratio e^(0.1/0.14) / 3 = 0.68 -> class 1; uniform votes (T large) -> class 1."""
    train = torch.stack([unit(0.9, 1), unit(0.8, 2), unit(0.8, 3), unit(0.8, 4), unit(-0.5, 5)])
    labels = torch.tensor([0, 1, 1, 1, 2])
    test = unit(1.0, 1).unsqueeze(0)
    expected = {0.07: 0, 0.14: 1, 100.0: 1}
    for T, cls in expected.items():
        predictions, scores = knn_predict(train, labels, test, 4, 3, T)
        assert predictions.tolist() == [cls], T
        ratio = math.exp((0.9 - 0.8) / T) / 3
        assert (scores[0, 0] / scores[0, 1]).item() == pytest.approx(ratio, rel=1e-9), T


def test_knn_top5_with_one_neighbour_counts_only_the_voted_class():
    """Official: top-5 looks at ``min(5, k)`` ranked classes. With k = 1 the single neighbour's class is the only
    prediction: a test image whose nearest neighbour has the wrong class is wrong at top-5 too, although only 3
    classes exist."""
    train = torch.eye(3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    test = torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.2]], dtype=torch.float64)  # nearest: class 0, class 1
    test_labels = torch.tensor([1, 1])  # the first one is wrong
    assert knn_classifier(train, labels, test, test_labels, 1, 0.07, 3) == pytest.approx((50.0, 50.0))


@pytest.mark.parametrize("n, avgpool", [(1, False), (4, False), (1, True), (3, True)])
def test_linear_probe_features_follow_n_last_blocks_and_avgpool(n, avgpool):
    """Official eval_linear: the CLS tokens of the last ``--n_last_blocks`` blocks (each through the final norm),
    concatenated oldest block first; with ``--avgpool_patchtokens`` also the mean of the last block's patch tokens
    (CLS excluded). Reference: the blocks run one by one with timm's modules. Through ``eval_linear.py``'s own
    choice of features from its flags."""
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", 16, 32).eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        normed = []
        for block in model.blocks:
            tokens = block(tokens)
            normed.append(model.norm(tokens))
        parts = [t[:, 0] for t in normed[-n:]]
        if avgpool:
            parts.append(normed[-1][:, 1:].mean(dim=1))
        expected = torch.cat(parts, dim=-1)
        flags = argparse.Namespace(n_last_blocks=n, avgpool_patchtokens=avgpool)
        torch.testing.assert_close(eval_linear.feature_selector(flags)(model, x), expected)
