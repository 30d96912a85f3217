"""``eval_stl10.py`` on ``mini_stl10`` (the tests' STL-10 stand-in, built learnable: each class darkens its own band
of rows in its own channel): every evaluation beats chance (10 %) by far, and its numbers are those of
scikit-learn (k-NN, logistic regression) and of the official weighted k-NN rule on the dumped features."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

import eval_stl10
from tests.data.test_stl10 import mini_stl10
from tests.eval.test_eval_semantics import official_knn
from utils.eval.features import FeatureDump

CHANCE = 10.0


@pytest.mark.slow
def test_mini_stl10_is_learned_better_than_chance_and_as_scikit_learn(tmp_path):
    data = mini_stl10(tmp_path / "stl10")
    flags = ["--arch", "vit_tiny", "--patch_size", "16", "--resize", "72", "--crop", "64", "--data_path", str(data)]
    flags += ["--shots", "5", "--episodes", "2", "--nb_knn", "5", "20", "--batch_size_per_gpu", "16"]
    flags += ["--num_workers", "0", "--device", "cpu", "--seed", "3", "--output_dir", str(tmp_path / "out")]
    results = eval_stl10.main(eval_stl10.get_args_parser().parse_args([*flags, "--dump_features", str(tmp_path / "f")]))

    knn, linear = results["knn"]["variants"], results["linear"]
    assert knn["weighted cosine"]["20"]["top1"] >= 5 * CHANCE
    assert linear["top1"] >= 5 * CHANCE
    assert results["fewshot"]["methods"]["class mean"]["5"]["mean"] >= 5 * CHANCE

    dump = FeatureDump.load(tmp_path / "f")
    train, test = dump.train_features.double().numpy(), dump.test_features.double().numpy()
    train_y, test_y = dump.train_labels.numpy(), dump.test_labels.numpy()
    assert len(train) == 60 and len(test) == 30
    for k in (5, 20):
        sk = KNeighborsClassifier(n_neighbors=k, metric="euclidean", algorithm="brute").fit(train, train_y)
        assert knn["uniform euclidean"][str(k)]["top1"] == pytest.approx(100.0 * (sk.predict(test) == test_y).mean())
        official_top1, official_top5, _ = official_knn(
            dump.train_features.double(), dump.train_labels, dump.test_features.double(), dump.test_labels, k, 0.07, 10
        )
        assert knn["weighted cosine"][str(k)]["top1"] == pytest.approx(official_top1)
        assert knn["weighted cosine"][str(k)]["top5"] == pytest.approx(official_top5)

    # the probe: logistic regression on standardised features at the chosen weight decay (C = 1 / (wd * N))
    mean, std = train.mean(axis=0), np.maximum(train.std(axis=0), 1e-6)
    wd = linear["weight_decay"]
    sk = LogisticRegression(C=1.0 / (wd * len(train)), tol=1e-10, max_iter=5000).fit((train - mean) / std, train_y)
    sk_top1 = 100.0 * (sk.predict((test - mean) / std) == test_y).mean()
    assert abs(linear["top1"] - sk_top1) <= 100.0 / 30 + 1e-9  # at most one test image apart
