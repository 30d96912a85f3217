"""Weighted k-nearest-neighbour classification of frozen features (the DINO k-NN evaluation).

Shapes used throughout:

* ``N`` training samples, ``M`` test samples, ``D`` feature dimensions, ``C`` classes, ``k`` neighbours.
* features: ``(N, D)`` / ``(M, D)`` floating tensors (fp16, bf16, fp32 or fp64), on any one device;
* labels: ``(N,)`` / ``(M,)`` integer tensors with values in ``[0, C)``.

Metrics and weightings (``metric`` x ``weighting``):

* ``"cosine"`` + ``"distance"`` (default, official DINO): features are L2-normalised, the similarity is the dot
  product ``s`` and every neighbour votes for its label with weight ``exp(s / T)``.
* ``"cosine"`` + ``"uniform"``: same neighbours, every vote weighs 1.
* ``"euclidean"`` + ``"uniform"``: features are used as given; neighbours are the ``k`` smallest Euclidean
  distances, every vote weighs 1. Reproduces scikit-learn's
  ``KNeighborsClassifier(n_neighbors=k, metric="euclidean", algorithm="brute")`` predictions.
* ``"euclidean"`` + ``"distance"``: as above but votes weigh ``exp(-d / T)``, ``d`` the Euclidean distance.

Tie rules (deterministic, on any device and chunk size):

* score ties between classes: the smallest class label ranks first (top-1 and top-5), as scikit-learn's mode;
* distance ties between the k-th and (k+1)-th neighbour (an ambiguous neighbour set): the training samples with
  the smallest indices are kept. scikit-learn keeps whichever its internal heap happens to keep (it depends on the
  data order and on its threading; its docs warn about this), so we reproduce its predictions exactly whenever the
  neighbour set is unambiguous (almost surely the case for continuous features).

Exponential weights are shifted per test sample by the weight of its closest neighbour (the closest neighbour
weighs exactly 1). This multiplies all class scores of a sample by one positive constant, so rankings and
accuracies are those of the unshifted formula, but nothing overflows for small ``T`` or large distances.

Memory: the test set is processed in chunks of ``chunk_size`` rows; the peak extra memory is
``O(chunk_size * N)`` (one similarity block, reused across chunks; by default about ``CPU_BLOCK_BYTES`` on CPU,
``ACCELERATOR_BLOCK_BYTES`` on GPU, where bigger blocks keep the device busy) plus one ``(N, D)`` copy of
the training features in the compute precision (normalised copy for ``"cosine"``, a cast for fp16/bf16 input).
Similarities are computed in fp32 (fp64 if the features are fp64), whatever the input precision.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

METRICS = ("cosine", "euclidean")
WEIGHTINGS = ("distance", "uniform")
CPU_BLOCK_BYTES = 128 * 2**20  # target size of one (chunk_size, N) similarity block on CPU
ACCELERATOR_BLOCK_BYTES = 1024 * 2**20  # ... on GPU (ImageNet: ~200 test rows per chunk against 1.28M train rows)
MAX_TOPK = 5


def default_chunk_size(num_train: int, element_bytes: int = 4, block_bytes: int = CPU_BLOCK_BYTES) -> int:
    """Number of test rows per chunk so that one ``(rows, num_train)`` block takes about ``block_bytes`` bytes.

    Args:
        num_train: ``N``, the number of training samples (columns of the block).
        element_bytes: bytes per similarity element (4 for fp32, 8 for fp64).
        block_bytes: memory budget of one block, in bytes (``CPU_BLOCK_BYTES`` or ``ACCELERATOR_BLOCK_BYTES``).

    Returns:
        An integer >= 1.
    """
    return max(1, block_bytes // (max(1, num_train) * element_bytes))


def compute_dtype(features: torch.Tensor) -> torch.dtype:
    """Precision of the similarity computation: fp64 stays fp64, everything else (fp16, bf16, fp32) is fp32."""
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def _check_args(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int,
    T: float,
    num_classes: int,
    metric: str,
    weighting: str,
) -> None:
    """Raise ``ValueError`` on inconsistent shapes or options (cheap checks only, no device sync on data)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if train_features.dim() != 2 or test_features.dim() != 2:
        raise ValueError("features must be 2-D (num_samples, dim)")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature dims differ: train {train_features.shape[1]} vs test {test_features.shape[1]}")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"train_labels must have shape ({train_features.shape[0]},), got {tuple(train_labels.shape)}")
    if not 1 <= k <= train_features.shape[0]:
        raise ValueError(f"k must be in [1, {train_features.shape[0]}] (number of training samples), got {k}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if weighting == "distance" and not T > 0:
        raise ValueError(f"temperature T must be > 0 for distance weighting, got {T}")


def prepare_train(
    train_features: torch.Tensor, metric: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cast (and for ``"cosine"`` L2-normalise) the training features once.

    Args:
        train_features: ``(N, D)``.
        metric: ``"cosine"`` or ``"euclidean"``.
        dtype: compute precision.

    Returns:
        ``(train, sq_norms)``: ``train`` is ``(N, D)`` in ``dtype`` (no copy for euclidean if already ``dtype``);
        ``sq_norms`` is ``(N,)`` squared L2 norms for ``"euclidean"``, ``None`` for ``"cosine"``.
    """
    train = train_features.to(dtype)
    if metric == "cosine":
        return F.normalize(train, dim=1), None
    return train, train.pow(2).sum(dim=1)


def closeness(
    test_chunk: torch.Tensor, train: torch.Tensor, train_sq_norms: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rank-preserving closeness between test rows and training rows (larger = nearer).

    Args:
        test_chunk: ``(B, D)`` test features, already in compute precision (normalised for cosine).
        train: ``(N, D)`` output of :func:`prepare_train`.
        train_sq_norms: ``(N,)`` squared norms for euclidean, ``None`` for cosine.
        out: optional contiguous ``(B, N)`` buffer to write into (reusing one buffer across chunks avoids
            page-faulting a fresh block every chunk).

    Returns:
        ``(B, N)``: the cosine similarity, or for euclidean ``2 x.y - |y|^2 = |x|^2 - |x - y|^2`` (the squared
        distance up to a per-row constant, the same surrogate scikit-learn ranks by).
    """
    if train_sq_norms is None:
        return torch.mm(test_chunk, train.T, out=out)
    return torch.addmm(train_sq_norms, test_chunk, train.T, beta=-1, alpha=2, out=out)


def _resolve_boundary_ties(block: torch.Tensor, kth: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of rows whose k-th and (k+1)-th values tie: keep the smallest column indices among ties.

    Args:
        block: ``(R, N)`` closeness rows.
        kth: ``(R, 1)`` k-th largest value of each row.
        k: number of neighbours.

    Returns:
        ``(values, indices)``, both ``(R, k)``, columns in increasing index order.
    """
    better = block > kth
    equal = block == kth
    need = k - better.sum(dim=1, keepdim=True, dtype=torch.int32)
    take = better | (equal & (equal.cumsum(dim=1, dtype=torch.int32) <= need))
    indices = take.nonzero()[:, 1].view(-1, k)  # row-major: exactly k hits per row
    return block.gather(1, indices), indices


def _top_candidates(block: torch.Tensor, count: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` largest values per row, found through the maxima of groups of ``group`` adjacent columns.

    The ``count`` groups with the largest maxima hold every value larger than the smallest of those maxima and at
    least ``count`` values not smaller, so the ``count`` largest values among their columns are the ``count``
    largest of the row (indices may differ only among equal values). One cheap ``amax`` pass replaces a full
    ``topk`` pass over the block.

    Args:
        block: ``(B, N)`` with contiguous rows; requires ``N >= count``.
        count: number of values wanted.
        group: columns per group.

    Returns:
        ``(values, indices)``, both ``(B, count)``, values sorted in decreasing order.
    """
    num_rows, num_cols = block.shape
    main = num_cols - num_cols % group
    maxima = block[:, :main].unflatten(1, (-1, group)).amax(dim=2)
    if main < num_cols:
        maxima = torch.cat([maxima, block[:, main:].amax(dim=1, keepdim=True)], dim=1)
    top_groups = maxima.topk(count, dim=1, sorted=False).indices
    columns = (top_groups[:, :, None] * group + torch.arange(group, device=block.device)).flatten(1)
    outside = columns >= num_cols  # past the end, in the last (partial) group
    candidates = block.gather(1, columns.clamp(max=num_cols - 1)).masked_fill_(outside, -torch.inf)
    values, positions = candidates.topk(count, dim=1, sorted=True)
    return values, columns.gather(1, positions)


def topk_smallest_index_ties(block: torch.Tensor, k: int, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` largest values per row; among equal values at the boundary, the smallest column indices win.

    ``torch.topk`` breaks ties arbitrarily; we find the ``k + 1`` largest values, and only rows where the
    k-th and (k+1)-th values are equal (an ambiguous neighbour set) are redone exactly.

    Args:
        block: ``(B, N)`` closeness with contiguous rows, ``1 <= k <= N``.
        k: number of neighbours.
        group: column group size of the candidate pre-selection (:func:`_top_candidates`), used when
            ``N >= 4 * group * (k + 1)``; ``0`` disables it.

    Returns:
        ``(values, indices)``, both ``(B, k)``; the order of neighbours within a row is unspecified.
    """
    num_cols = block.shape[1]
    if k == num_cols:
        indices = torch.arange(num_cols, device=block.device).expand(block.shape[0], -1)
        return block, indices
    if group and num_cols >= 4 * group * (k + 1):
        values, indices = _top_candidates(block, k + 1, group)
    else:
        values, indices = block.topk(k + 1, dim=1, largest=True, sorted=True)
    tied_rows = (values[:, k] == values[:, k - 1]).nonzero().squeeze(1)
    values, indices = values[:, :k].clone(), indices[:, :k].clone()
    if tied_rows.numel():
        step = max(1, block.shape[0] // 4)  # bounds the fix-up temporaries to ~1 block
        for start in range(0, tied_rows.numel(), step):
            rows = tied_rows[start : start + step]
            v, i = _resolve_boundary_ties(block[rows], values[rows, k - 1 : k], k)
            values[rows], indices[rows] = v, i
    return values, indices


def neighbour_weights(
    values: torch.Tensor, test_sq_norms: torch.Tensor | None, T: float, weighting: str
) -> torch.Tensor:
    """Vote weight of each retrieved neighbour.

    Args:
        values: ``(B, k)`` closeness of the neighbours (see :func:`closeness`).
        test_sq_norms: ``(B,)`` squared norms of the test rows for euclidean, ``None`` for cosine.
        T: temperature (ignored for ``"uniform"``).
        weighting: ``"distance"`` or ``"uniform"``.

    Returns:
        ``(B, k)``: ones, or ``exp(s / T)`` (cosine) / ``exp(-d / T)`` (euclidean, ``d`` the distance), each row
        divided by its largest weight (see module docstring).
    """
    if weighting == "uniform":
        return torch.ones_like(values)
    if test_sq_norms is None:
        logits = values / T
    else:
        logits = -(test_sq_norms[:, None] - values).clamp_(min=0).sqrt_() / T
    return (logits - logits.max(dim=1, keepdim=True).values).exp_()


def vote(neighbour_labels: torch.Tensor, weights: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Sum the neighbour weights per class.

    Args:
        neighbour_labels: ``(B, k)`` int64 labels in ``[0, C)``.
        weights: ``(B, k)`` vote weights.
        num_classes: ``C``.

    Returns:
        ``(B, C)`` class scores (vote counts for uniform weighting).
    """
    scores = weights.new_zeros(neighbour_labels.shape[0], num_classes)
    return scores.scatter_add_(1, neighbour_labels, weights)


def rank_classes(scores: torch.Tensor) -> torch.Tensor:
    """Classes sorted by decreasing score, ties broken towards the smaller class label.

    Args:
        scores: ``(B, C)``.

    Returns:
        ``(B, C)`` int64 class labels; column 0 is the prediction.
    """
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


@torch.no_grad()
def iter_knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int,
    num_classes: int,
    T: float = 0.07,
    metric: str = "cosine",
    weighting: str = "distance",
    chunk_size: int | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Class scores of the test set, one chunk of test rows at a time.

    Args:
        train_features: ``(N, D)`` floating tensor; its device is the compute device.
        train_labels: ``(N,)`` integer labels in ``[0, num_classes)``.
        test_features: ``(M, D)`` floating tensor (moved chunk by chunk to the training features' device).
        k: number of neighbours, ``1 <= k <= N``.
        num_classes: ``C``.
        T: temperature of the exponential weights (``weighting="distance"`` only).
        metric: ``"cosine"`` or ``"euclidean"``.
        weighting: ``"distance"`` or ``"uniform"``.
        chunk_size: test rows per chunk; ``None`` picks :func:`default_chunk_size` for the device's budget.

    Yields:
        ``(start, scores)``: ``scores`` is ``(B, C)`` (fp32, fp64 for fp64 features) for test rows
        ``start : start + B``.
    """
    _check_args(train_features, train_labels, test_features, k, T, num_classes, metric, weighting)
    device, dtype = train_features.device, compute_dtype(train_features)
    train, train_sq_norms = prepare_train(train_features, metric, dtype)
    labels = train_labels.to(device=device, dtype=torch.long)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"train_labels must lie in [0, {num_classes})")
    if chunk_size is None:
        budget = CPU_BLOCK_BYTES if device.type == "cpu" else ACCELERATOR_BLOCK_BYTES
        chunk_size = default_chunk_size(train.shape[0], torch.finfo(dtype).bits // 8, budget)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    buffer = train.new_empty(min(chunk_size, test_features.shape[0]), train.shape[0])  # one block, reused
    for start in range(0, test_features.shape[0], chunk_size):
        chunk = test_features[start : start + chunk_size].to(device=device, dtype=dtype)
        if metric == "cosine":
            chunk, test_sq_norms = F.normalize(chunk, dim=1), None
        else:
            test_sq_norms = chunk.pow(2).sum(dim=1)
        block = closeness(chunk, train, train_sq_norms, out=buffer[: chunk.shape[0]])
        values, indices = topk_smallest_index_ties(block, k)
        weights = neighbour_weights(values, test_sq_norms, T, weighting)
        yield start, vote(labels[indices], weights, num_classes)


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int,
    num_classes: int,
    T: float = 0.07,
    metric: str = "cosine",
    weighting: str = "distance",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted class and class scores of every test sample (arguments as :func:`iter_knn_scores`).

    Returns:
        ``(predictions, scores)``: ``(M,)`` int64 labels and ``(M, C)`` scores, on the training features' device.
        Scores are per-sample rescaled weighted votes (vote counts for uniform weighting).
    """
    dtype = compute_dtype(train_features)
    scores = torch.empty(test_features.shape[0], num_classes, dtype=dtype, device=train_features.device)
    for start, chunk_scores in iter_knn_scores(
        train_features, train_labels, test_features, k, num_classes, T, metric, weighting, chunk_size
    ):
        scores[start : start + chunk_scores.shape[0]] = chunk_scores
    predictions = rank_classes(scores)[:, 0] if scores.shape[0] else scores.new_empty(0, dtype=torch.long)
    return predictions, scores


def knn_classifier(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int,
    T: float,
    num_classes: int,
    metric: str = "cosine",
    weighting: str = "distance",
    chunk_size: int | None = None,
) -> tuple[float, float]:
    """k-NN top-1 and top-5 accuracy of the test set (DINO's evaluation; arguments as :func:`iter_knn_scores`).

    Args:
        test_labels: ``(M,)`` integer labels, ``M >= 1``.

    Returns:
        ``(top1, top5)`` in percent. "Top-5" counts a hit when the label is among the ``min(5, k, num_classes)``
        best-scored classes (ties towards smaller labels): with ``k < 5`` neighbours only classes that got a vote
        can be hits, as in official DINO's ``knn_classifier``.
    """
    if test_features.shape[0] == 0:
        raise ValueError("empty test set: accuracy is undefined")
    if test_labels.shape != (test_features.shape[0],):
        raise ValueError(f"test_labels must have shape ({test_features.shape[0]},), got {tuple(test_labels.shape)}")
    maxk = min(MAX_TOPK, k, num_classes)
    hits = torch.zeros(2, dtype=torch.long, device=train_features.device)  # (top-1, top-5) hits, no per-chunk sync
    for start, scores in iter_knn_scores(
        train_features, train_labels, test_features, k, num_classes, T, metric, weighting, chunk_size
    ):
        targets = test_labels[start : start + scores.shape[0]].to(device=scores.device, dtype=torch.long)
        correct = rank_classes(scores)[:, :maxk] == targets[:, None]
        hits += torch.stack([correct[:, 0].sum(), correct.any(dim=1).sum()])
    top1, top5 = (100.0 * hits.double() / test_features.shape[0]).tolist()
    return top1, top5
