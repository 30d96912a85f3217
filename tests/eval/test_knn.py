"""Tests of utils/eval/knn.py against scikit-learn and against plain per-sample numpy references."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from tests.conftest import run_benchmark_quick
from utils.eval.knn import default_chunk_size, knn_classifier, knn_predict, topk_smallest_index_ties

REPO_ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------- references


def sklearn_predict(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, k: int) -> np.ndarray:
    """Oracle: scikit-learn brute-force Euclidean k-NN with uniform votes."""
    clf = KNeighborsClassifier(n_neighbors=k, metric="euclidean", algorithm="brute")
    return clf.fit(train, train_labels).predict(test)


def reference_scores(
    train: np.ndarray,
    train_labels: np.ndarray,
    test: np.ndarray,
    k: int,
    T: float,
    num_classes: int,
    metric: str,
    weighting: str,
) -> np.ndarray:
    """Plain per-sample loop (float64): class scores ``(M, C)`` without any rescaling.

    Neighbours are sorted by (distance, index), the documented tie rule.
    """
    train, test = train.astype(np.float64), test.astype(np.float64)
    if metric == "cosine":
        train = train / np.linalg.norm(train, axis=1, keepdims=True)
        test = test / np.linalg.norm(test, axis=1, keepdims=True)
    scores = np.zeros((len(test), num_classes))
    for i, x in enumerate(test):
        if metric == "cosine":
            sims = train @ x
            order = np.argsort(-sims, kind="stable")[:k]
            weights = np.exp(sims[order] / T)
        else:
            dists = np.sqrt(((train - x) ** 2).sum(axis=1))
            order = np.argsort(dists, kind="stable")[:k]
            weights = np.exp(-dists[order] / T)
        if weighting == "uniform":
            weights = np.ones(k)
        for label, w in zip(train_labels[order], weights):
            scores[i, label] += w
    return scores


def reference_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> tuple[float, float]:
    """Top-1 / top-5 in percent, "top-5" over the ``min(5, k)`` best classes as official DINO's ``knn_classifier``
    (``correct.narrow(1, 0, min(5, k))``; and at most C); score ties rank the smaller class first."""
    ranking = np.argsort(-scores, axis=1, kind="stable")[:, : min(5, k, scores.shape[1])]
    correct = ranking == labels[:, None]
    return 100.0 * correct[:, 0].mean(), 100.0 * correct.any(axis=1).mean()


def make_data(n_train: int, n_test: int, dim: int, num_classes: int, seed: int = 0, integer_high: int = 0):
    """Random float64 features (or integers in [0, integer_high) when > 0: many ties) and labels, as numpy arrays."""
    rng = np.random.default_rng(seed)
    if integer_high:
        train = rng.integers(0, integer_high, size=(n_train, dim)).astype(np.float64)
        test = rng.integers(0, integer_high, size=(n_test, dim)).astype(np.float64)
    else:
        train, test = rng.standard_normal((n_train, dim)), rng.standard_normal((n_test, dim))
    return train, rng.integers(0, num_classes, n_train), test, rng.integers(0, num_classes, n_test)


def tie_statistics(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, k: int, num_classes: int):
    """Count test rows whose k-th neighbour distance is tied and rows whose uniform vote has several winners."""
    boundary_ties = vote_ties = 0
    for x in test:
        dists = ((train - x) ** 2).sum(axis=1)
        order = np.argsort(dists, kind="stable")
        boundary_ties += k < len(train) and dists[order[k]] == dists[order[k - 1]]
        counts = np.bincount(train_labels[order[:k]], minlength=num_classes)
        vote_ties += (counts == counts.max()).sum() > 1
    return boundary_ties, vote_ties


def ours_predict(train, train_labels, test, k, num_classes, **kwargs) -> np.ndarray:
    predictions, _ = knn_predict(
        torch.from_numpy(train), torch.from_numpy(train_labels), torch.from_numpy(test), k, num_classes, **kwargs
    )
    return predictions.numpy()


# ----------------------------------------------------------------------------------------------- scikit-learn


@pytest.mark.parametrize("k", [1, 5, 20])
def test_uniform_euclidean_matches_sklearn_on_random_features(k):
    train, ytr, test, yte = make_data(3000, 150, 16, num_classes=7, seed=k)  # N large enough for group pre-selection
    expected = sklearn_predict(train, ytr, test, k)
    ours = ours_predict(train, ytr, test, k, 7, metric="euclidean", weighting="uniform")
    np.testing.assert_array_equal(ours, expected)
    args = [torch.from_numpy(a) for a in (train, ytr, test, yte)]
    top1, _ = knn_classifier(*args, k, 0.07, 7, metric="euclidean", weighting="uniform")
    assert top1 == pytest.approx(100.0 * np.mean(expected == yte), abs=1e-9)


def make_duplicated_data(copies: int, seed: int, dtype=np.float64):
    """Random base points, each repeated ``copies`` times (shuffled), every copy with its own random label.

    Distances tie exactly within a group of copies, and with ``k`` a multiple of ``copies`` the k-th and (k+1)-th
    neighbours are never tied, so the neighbour set is unambiguous while votes tie often.
    """
    rng = np.random.default_rng(seed)
    train = np.repeat(rng.standard_normal((1500, 6)), copies, axis=0)[rng.permutation(1500 * copies)]
    test = rng.standard_normal((200, 6))
    return train.astype(dtype), rng.integers(0, 4, len(train)), test.astype(dtype), rng.integers(0, 4, len(test))


@pytest.mark.parametrize(("copies", "k"), [(2, 2), (5, 5), (4, 20), (2, 20)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_uniform_euclidean_matches_sklearn_with_duplicates_and_vote_ties(copies, k, dtype):
    train, ytr, test, yte = make_duplicated_data(copies, seed=10 * copies + k, dtype=dtype)
    boundary_ties, vote_ties = tie_statistics(train.astype(np.float64), ytr, test.astype(np.float64), k, 4)
    assert boundary_ties == 0, "construction guarantees an unambiguous neighbour set"
    assert vote_ties >= 10, "the data must exercise the vote tie rule"
    expected = sklearn_predict(train, ytr, test, k)
    ours = ours_predict(train, ytr, test, k, 4, metric="euclidean", weighting="uniform", chunk_size=16)
    np.testing.assert_array_equal(ours, expected)
    args = [torch.from_numpy(a) for a in (train, ytr, test, yte)]
    top1, top5 = knn_classifier(*args, k, 0.07, 4, metric="euclidean", weighting="uniform")
    assert top1 == pytest.approx(100.0 * np.mean(expected == yte), abs=1e-9)
    ref = reference_scores(train, ytr, test, k, 0.07, 4, "euclidean", "uniform")
    assert top5 == pytest.approx(reference_accuracy(ref, yte, k)[1], abs=1e-9)
    if k >= 4:
        assert top5 == 100.0  # min(5, k, 4 classes) = every class


@pytest.mark.parametrize("k", [1, 5, 20])
def test_uniform_euclidean_with_ambiguous_neighbour_sets(k):
    """Integer features in {0..4}^5: distances tie often, also between the k-th and (k+1)-th neighbour.

    There, scikit-learn's choice among the equidistant candidates is an artefact of its heap and threading (its
    docs: "the results will depend on the ordering of the training data"), so we match it exactly on the rows
    whose neighbour set is unambiguous, and match our documented rule (smallest training index) on all rows.
    """
    train, ytr, test, yte = make_data(300, 200, 5, num_classes=4, seed=100 + k, integer_high=5)
    expected = sklearn_predict(train, ytr, test, k)
    ours = ours_predict(train, ytr, test, k, 4, metric="euclidean", weighting="uniform", chunk_size=16)
    ambiguous = np.array([tie_statistics(train, ytr, x[None], k, 4)[0] > 0 for x in test])
    vote_tied = np.array([tie_statistics(train, ytr, x[None], k, 4)[1] > 0 for x in test])
    assert ambiguous.any() and (~ambiguous).sum() >= 20
    assert k == 1 or (vote_tied & ~ambiguous).any()
    np.testing.assert_array_equal(ours[~ambiguous], expected[~ambiguous])
    reference = reference_scores(train, ytr, test, k, 0.07, 4, "euclidean", "uniform").argmax(axis=1)
    np.testing.assert_array_equal(ours, reference)


def test_sklearn_tie_rules_are_what_we_assume():
    """Guards the assumptions the implementation encodes: nearest-index wins distance ties, smallest label wins."""
    train = np.zeros((10, 2))
    labels = np.array([3, 2, 1, 0, 3, 2, 1, 0, 0, 0])
    clf = KNeighborsClassifier(n_neighbors=4, metric="euclidean", algorithm="brute").fit(train, labels)
    neighbours = clf.kneighbors(np.ones((1, 2)), return_distance=False)
    assert sorted(neighbours[0].tolist()) == [0, 1, 2, 3]
    assert clf.predict(np.ones((1, 2)))[0] == 0  # four-way vote tie -> smallest label
    ours = ours_predict(train, labels, np.ones((1, 2)), 4, 4, metric="euclidean", weighting="uniform")
    assert ours[0] == 0


def test_uniform_top5_against_reference_with_ties():
    train, ytr, test, yte = make_data(400, 120, 3, num_classes=9, seed=7, integer_high=3)
    for metric in ("euclidean", "cosine"):
        test_nz, train_nz = test + 1.0, train + 1.0  # no zero vectors for cosine
        expected = reference_accuracy(reference_scores(train_nz, ytr, test_nz, 6, 0.07, 9, metric, "uniform"), yte, 6)
        args = [torch.from_numpy(a) for a in (train_nz, ytr, test_nz, yte)]
        assert knn_classifier(*args, 6, 0.07, 9, metric=metric, weighting="uniform") == pytest.approx(expected)


@pytest.mark.parametrize("group", [0, 8, 32])
def test_topk_selection_against_stable_sort(group):
    """Neighbour selection = the k largest values, smallest column index first among equal values."""
    gen = torch.Generator().manual_seed(group)
    for trial in range(60):
        rows, cols = int(torch.randint(1, 12, (), generator=gen)), int(torch.randint(2, 6000, (), generator=gen))
        k = int(torch.randint(1, min(cols, 40) + 1, (), generator=gen))
        if trial % 2:  # few distinct values: ties everywhere, also at the k-th value
            block = torch.randint(0, int(torch.randint(2, 500, (), generator=gen)), (rows, cols), generator=gen).float()
        else:
            block = torch.randn(rows, cols, generator=gen)
        values, indices = topk_smallest_index_ties(block, k, group=group)
        expected = torch.sort(-block, dim=1, stable=True).indices[:, :k]
        torch.testing.assert_close(indices.sort(dim=1).values, expected.sort(dim=1).values, rtol=0, atol=0)
        torch.testing.assert_close(values, block.gather(1, indices), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- weighted


@pytest.mark.parametrize(("metric", "T"), [("cosine", 0.07), ("cosine", 0.01), ("euclidean", 0.5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_weighted_matches_plain_reference(metric, T, dtype):
    train, ytr, test, yte = make_data(500, 200, 24, num_classes=10, seed=3)
    ref = reference_scores(train, ytr, test, 20, T, 10, metric, "distance")
    args = [torch.from_numpy(train).to(dtype), torch.from_numpy(ytr), torch.from_numpy(test).to(dtype)]
    predictions, scores = knn_predict(*args, 20, 10, T=T, metric=metric, weighting="distance")
    np.testing.assert_array_equal(predictions.numpy(), np.argmax(ref, axis=1))
    if dtype == torch.float64:  # scores equal the reference up to one positive factor per sample
        ours = scores.numpy()
        ratio = ref.max(axis=1, keepdims=True) / ours.max(axis=1, keepdims=True)
        np.testing.assert_allclose(ours * ratio, ref, rtol=1e-9, atol=1e-300)
    top = knn_classifier(*args, torch.from_numpy(yte), 20, T, 10, metric=metric, weighting="distance")
    assert top == pytest.approx(reference_accuracy(ref, yte, 20), abs=1e-9)


def test_temperature_and_vote_weights_on_a_hand_computed_example():
    """Test sample x = e0; neighbours: one of class 0 at cosine 0.9, two of class 1 at cosine 0.6 (k = 3).
    Official vote: class score = sum over its neighbours of exp(cos / T):
    T = 0.07: class 0 exp(0.9 / 0.07) = e^12.857 > class 1 2 e^(0.6 / 0.07) = 2 e^8.571: predicts 0;
    T = 1: class 0 e^0.9 = 2.460 < class 1 2 e^0.6 = 3.644: predicts 1; uniform votes: 1 vs 2: predicts 1."""
    a, b = 0.9, 0.6
    train = torch.tensor(
        [[a, (1 - a**2) ** 0.5, 0.0, 0.0], [b, 0.0, (1 - b**2) ** 0.5, 0.0], [b, 0.0, 0.0, (1 - b**2) ** 0.5]],
        dtype=torch.float64,
    )
    labels, test = torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    for T, expected in ((0.07, 0), (1.0, 1)):
        predictions, scores = knn_predict(train, labels, test, 3, 2, T=T)
        assert predictions.tolist() == [expected]
        hand = torch.tensor([np.exp(a / T), 2 * np.exp(b / T)], dtype=torch.float64)
        torch.testing.assert_close(scores[0] / scores[0].sum(), hand / hand.sum(), rtol=1e-12, atol=0)
    predictions, scores = knn_predict(train, labels, test, 3, 2, T=0.07, weighting="uniform")
    assert predictions.tolist() == [1] and scores[0].tolist() == [1.0, 2.0]


def test_top5_with_fewer_than_five_neighbours_counts_only_voted_classes():
    """k = 1: the single neighbour (class 2) votes; the true class 0 got no vote. Official DINO counts top-5 over the
    min(5, k) = 1 best classes: 0 % top-5 (not 100 % because class 0 ranks among the zero-score classes)."""
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 2])
    test, test_labels = torch.tensor([[-1.0, 0.1]]), torch.tensor([0])
    assert knn_classifier(train, labels, test, test_labels, 1, 0.07, 3) == (0.0, 0.0)
    # k = 2: the neighbours are class 2 (cos 0.995) and class 1 (cos 0.0995); class 0 (cos -0.995) still has no vote
    assert knn_classifier(train, labels, test, test_labels, 2, 0.07, 3) == (0.0, 0.0)
    assert knn_classifier(train, labels, test, torch.tensor([1]), 2, 0.07, 3) == (0.0, 100.0)


@pytest.mark.parametrize("n_test", [1, 7, 99])
def test_small_test_sets(n_test):
    train, ytr, test, yte = make_data(300, n_test, 8, num_classes=6, seed=n_test)
    expected = reference_accuracy(reference_scores(train, ytr, test, 5, 0.07, 6, "cosine", "distance"), yte, 5)
    args = [torch.from_numpy(a) for a in (train, ytr, test, yte)]
    assert knn_classifier(*args, 5, 0.07, 6) == pytest.approx(expected, abs=1e-9)


def test_fewer_than_five_classes_and_k_equal_to_train_size():
    train, ytr, test, yte = make_data(12, 9, 4, num_classes=3, seed=1)
    args = [torch.from_numpy(a) for a in (train, ytr, test, yte)]
    top1, top5 = knn_classifier(*args, 12, 0.07, 3)
    assert top5 == 100.0
    ref = reference_scores(train, ytr, test, 12, 0.07, 3, "cosine", "distance")
    assert top1 == pytest.approx(reference_accuracy(ref, yte, 12)[0])


@pytest.mark.parametrize(("metric", "weighting"), [("cosine", "distance"), ("euclidean", "uniform")])
def test_chunking_does_not_change_results(metric, weighting):
    train, ytr, test, yte = make_data(700, 53, 12, num_classes=5, seed=11)
    args = [torch.from_numpy(a).float() if a.dtype == np.float64 else torch.from_numpy(a) for a in (train, ytr, test)]
    one_pred, one_scores = knn_predict(*args, 10, 5, metric=metric, weighting=weighting, chunk_size=10_000)
    for chunk_size in (1, 4, 50, None):
        pred, scores = knn_predict(*args, 10, 5, metric=metric, weighting=weighting, chunk_size=chunk_size)
        torch.testing.assert_close(pred, one_pred, rtol=0, atol=0)
        torch.testing.assert_close(scores, one_scores, rtol=1e-5, atol=1e-6)
        options = {"metric": metric, "weighting": weighting}
        chunked = knn_classifier(*args, torch.from_numpy(yte), 10, 0.07, 5, chunk_size=chunk_size, **options)
        assert chunked == knn_classifier(*args, torch.from_numpy(yte), 10, 0.07, 5, chunk_size=10_000, **options)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input(dtype):
    train, ytr, test, yte = make_data(400, 60, 32, num_classes=10, seed=5)
    low = [torch.from_numpy(train).to(dtype), torch.from_numpy(ytr), torch.from_numpy(test).to(dtype)]
    upcast = [low[0].float(), low[1], low[2].float()]
    pred, scores = knn_predict(*low, 20, 10)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    torch.testing.assert_close(pred, knn_predict(*upcast, 20, 10)[0], rtol=0, atol=0)
    yte_t = torch.from_numpy(yte)
    assert knn_classifier(*low, yte_t, 20, 0.07, 10) == knn_classifier(*upcast, yte_t, 20, 0.07, 10)


def test_int32_labels_and_invalid_arguments():
    train, ytr, test, yte = make_data(50, 5, 4, num_classes=3, seed=2)
    tr, te = torch.from_numpy(train), torch.from_numpy(test)
    y32, yte_t = torch.from_numpy(ytr).int(), torch.from_numpy(yte)
    assert knn_classifier(tr, y32, te, yte_t, 5, 0.07, 3) == knn_classifier(tr, y32.long(), te, yte_t, 5, 0.07, 3)
    with pytest.raises(ValueError, match="k must be"):
        knn_classifier(tr, y32, te, yte_t, 51, 0.07, 3)
    with pytest.raises(ValueError, match="train_labels must lie"):
        knn_classifier(tr, y32, te, yte_t, 5, 0.07, 2)
    with pytest.raises(ValueError, match="metric"):
        knn_classifier(tr, y32, te, yte_t, 5, 0.07, 3, metric="manhattan")
    with pytest.raises(ValueError, match="chunk_size"):
        knn_classifier(tr, y32, te, yte_t, 5, 0.07, 3, chunk_size=0)
    with pytest.raises(ValueError, match="empty test set"):
        knn_classifier(tr, y32, te[:0], yte_t[:0], 5, 0.07, 3)


def test_default_chunk_size_respects_budget():
    assert default_chunk_size(100_000) * 100_000 * 4 <= 128 * 2**20
    assert default_chunk_size(10**12) == 1
    assert default_chunk_size(10, block_bytes=4000) == 100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    train, ytr, test, yte = make_data(2000, 300, 64, num_classes=10, seed=9)
    cpu = [torch.from_numpy(a).float() if a.dtype == np.float64 else torch.from_numpy(a) for a in (train, ytr, test)]
    gpu = [t.cuda() for t in cpu]
    pred_cpu, _ = knn_predict(*cpu, 20, 10)
    pred_gpu, scores_gpu = knn_predict(*[g.half() if g.is_floating_point() else g for g in gpu], 20, 10)
    assert scores_gpu.device.type == "cuda"
    assert (pred_gpu.cpu() == pred_cpu).float().mean() > 0.97  # fp16 inputs: near-ties may flip
    yte_t = torch.from_numpy(yte)
    assert knn_classifier(*gpu, yte_t.cuda(), 20, 0.07, 10) == pytest.approx(knn_classifier(*cpu, yte_t, 20, 0.07, 10))


# ----------------------------------------------------------------------------------------------- memory / bench

MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, time
    import torch
    from utils.eval.knn import knn_classifier

    def peak():  # VmHWM, not ru_maxrss: a fork+exec child inherits its parent's (pytest's) peak in ru_maxrss
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))

    def reset_peak():  # Linux >= 4.0: peak := current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    n_train, n_test, dim, classes = 100_000, 10_000, 192, 10
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(n_train, dim, generator=g), torch.randn(n_test, dim, generator=g)
    ytr, yte = torch.randint(0, classes, (n_train,), generator=g), torch.randint(0, classes, (n_test,), generator=g)
    knn_classifier(train[:500], ytr[:500], test[:5], yte[:5], 20, 0.07, classes)  # warm-up: libraries, threads
    reset_peak()
    base, start = peak(), time.perf_counter()
    knn_classifier(train, ytr, test, yte, 20, 0.07, classes)  # cosine: also holds a normalised train copy
    extra, seconds = peak() - base, time.perf_counter() - start
    reset_peak()
    base = peak()
    control = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched: proves the measurement sees allocations
    print(json.dumps({"extra_bytes": extra, "seconds": seconds, "control_bytes": peak() - base}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS accounting")
def test_peak_memory_is_far_below_full_similarity_matrix():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-c", MEMORY_SCRIPT]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    full_matrix = 100_000 * 10_000 * 4
    assert result["control_bytes"] >= 60 * 2**20, f"memory measurement is broken: {result}"
    fraction = result["extra_bytes"] / full_matrix
    mib = result["extra_bytes"] / 2**20
    print(f"\nk-NN 100k x 10k: peak extra memory {mib:.0f} MiB = {100 * fraction:.1f}% of the full similarity matrix")
    print(f"({full_matrix / 2**20:.0f} MiB), {result['seconds']:.1f} s")
    assert fraction <= 0.10


def test_benchmark_quick_json(tmp_path):
    report, _ = run_benchmark_quick("bench_knn.py", [], tmp_path / "bench.json")
    assert {"config", "results", "speedup_vs_sklearn", "full_similarity_bytes", "predictions_match_sklearn"} <= set(
        report
    )
    assert set(report["results"]) == {"tinydino", "sklearn_brute_n_jobs1", "sklearn_brute_default"}
    for r in report["results"].values():
        assert {"times_s", "median_s", "min_s", "max_s", "cpu_times_s", "median_cpu_s", "peak_extra_bytes"} <= set(r)
        times = sorted(r["times_s"])  # the summary is of the timings it reports (median by hand)
        assert len(times) == report["config"]["repeats"] and (r["min_s"], r["max_s"]) == (times[0], times[-1])
        assert r["median_s"] == (times[(len(times) - 1) // 2] + times[len(times) // 2]) / 2
        assert r["peak_extra_bytes"] >= 0
    assert report["predictions_match_sklearn"] is True
    for key in ("speedup_vs_sklearn", "speedup_vs_sklearn_best_of", "speedup_vs_sklearn_cpu_time"):
        assert set(report[key]) == {"sklearn_brute_n_jobs1", "sklearn_brute_default"}
        assert all(v > 0 for v in report[key].values())
    assert {"speedup_met", "memory_met"} <= set(report["targets"])
