"""Evaluations of frozen features beyond the k-NN: few-shot episodes, a linear probe, and their report and plot.

Few-shot (:func:`run_fewshot`): for each ``K`` and episode, :func:`sample_episode` draws exactly ``K`` labelled
training samples per class (seeded by ``(seed, K, episode)``: reproducible, and independent of which other ``K`` or
how many episodes are asked for); every test sample is then classified from those ``K * C`` samples only, on
L2-normalised features, by

* ``1-NN``: the class of the most cosine-similar support sample;
* ``k-NN``: DINO's weighted vote (weights ``exp(cos / T)``) over the ``k = min(knn_k, K * C)`` nearest support
  samples (:func:`utils.eval.knn.knn_predict`);
* ``class mean``: the class whose mean support feature (re-normalised) is the most cosine-similar ("prototype").

Accuracies over episodes are summarised as mean ± half-width of a 95 % confidence interval of the mean,
``1.96 * s / sqrt(n)`` with ``s`` the sample standard deviation (``ddof=1``) over the ``n`` episodes: the normal
approximation that few-shot papers report. It is slightly narrow for few episodes (Student's t would use 2.26
instead of 1.96 for 10 episodes); with one episode the interval is undefined (NaN, ``null`` in JSON).

Linear probe (:func:`linear_probe`): multinomial logistic regression ``softmax(W x + b)`` on the standardised
cached features (no augmentation, unlike DINO's ``eval_linear.py`` which trains on augmented crops), trained by the
linear-probe trainer (:func:`utils.eval.linear_probe.train_epoch`) full-batch with L-BFGS in float64 from zero (a
convex problem, hence deterministic) on the loss
``mean cross-entropy + weight_decay / 2 * ||W||^2``. This is scikit-learn's ``LogisticRegression(C=1 / (weight_decay
* N))``. The weight decay is picked among candidates by top-1 on a stratified, seeded hold-out part of the
training set (ties: the larger weight decay), then the classifier is refitted on the whole training set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from utils.eval.knn import knn_predict
from utils.eval.linear_probe import LinearClassifierGrid, train_epoch

__all__ = [
    "FEWSHOT_METHODS",
    "Z_95",
    "sample_episode",
    "nearest_mean_predict",
    "fewshot_knn_k",
    "run_fewshot",
    "confidence_interval",
    "summarize_accuracies",
    "subsample_indices",
    "LinearProbeResult",
    "train_logistic_regression",
    "linear_probe",
    "format_report",
    "plot_fewshot",
]

FEWSHOT_METHODS = ("1-NN", "k-NN", "class mean")
Z_95 = 1.959963984540054  # two-sided 95 % quantile of the standard normal


# --------------------------------------------------------------------------------------------------------------------
# few-shot
# --------------------------------------------------------------------------------------------------------------------


def sample_episode(
    labels: torch.Tensor | np.ndarray, shots: int, num_classes: int, seed: int, episode: int
) -> torch.Tensor:
    """Indices of exactly ``shots`` training samples of each class ``0..num_classes-1``, class by class.

    The draw (without replacement within a class) depends only on ``(seed, shots, episode)`` and ``labels``.
    Raises ``ValueError`` naming the class when one has fewer than ``shots`` samples.
    """
    if shots < 1:
        raise ValueError(f"the number of shots must be >= 1, got {shots}")
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    rng = np.random.default_rng([seed, shots, episode])
    chosen = []
    for c in range(num_classes):
        pool = np.flatnonzero(labels == c)
        if pool.size < shots:
            raise ValueError(
                f"class {c} has {pool.size} training samples, fewer than {shots} shots "
                "(lower the shots or raise --max_train)"
            )
        chosen.append(np.sort(rng.choice(pool, size=shots, replace=False)))
    return torch.from_numpy(np.concatenate(chosen)).long()


def nearest_mean_predict(
    support: torch.Tensor, support_labels: torch.Tensor, queries: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Class of the most cosine-similar class mean ("prototype") of the L2-normalised support features.

    ``support [S, D]``, ``support_labels [S]`` (every class present), ``queries [M, D]`` → ``[M]`` int64 (ties:
    the smaller class).
    """
    support = F.normalize(support.float(), dim=1)
    means = support.new_zeros(num_classes, support.shape[1]).index_add_(0, support_labels.to(support.device), support)
    prototypes = F.normalize(means, dim=1)
    return (F.normalize(queries.float().to(support.device), dim=1) @ prototypes.T).argmax(dim=1)


def fewshot_knn_k(shots: int, num_classes: int, knn_k: int = 20) -> int:
    """Neighbours of the few-shot k-NN: ``min(knn_k, shots * num_classes)`` (all support samples if fewer)."""
    return max(1, min(knn_k, shots * num_classes))


@torch.no_grad()
def run_fewshot(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    shots: Sequence[int],
    episodes: int,
    num_classes: int,
    seed: int = 0,
    temperature: float = 0.07,
    knn_k: int = 20,
    device: torch.device | str = "cpu",
) -> dict[str, dict[int, list[float]]]:
    """Top-1 accuracies (%) on the whole test set of each method, shot count and episode.

    Returns ``{method: {K: [accuracy of episode 0, 1, ...]}}`` for the methods of :data:`FEWSHOT_METHODS`.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    device = torch.device(device)
    train = F.normalize(train_features.float(), dim=1).to(device)
    test = F.normalize(test_features.float(), dim=1).to(device)
    train_labels = train_labels.long().to(device)
    test_labels = test_labels.long().to(device)
    results: dict[str, dict[int, list[float]]] = {m: {} for m in FEWSHOT_METHODS}

    def accuracy(predictions: torch.Tensor) -> float:
        return 100.0 * (predictions == test_labels).double().mean().item()

    for k_shot in shots:
        for method in FEWSHOT_METHODS:
            results[method][k_shot] = []
        k = fewshot_knn_k(k_shot, num_classes, knn_k)
        for episode in range(episodes):
            index = sample_episode(train_labels, k_shot, num_classes, seed, episode).to(device)
            support, support_labels = train[index], train_labels[index]
            one, _ = knn_predict(support, support_labels, test, 1, num_classes, metric="cosine", weighting="uniform")
            weighted, _ = knn_predict(support, support_labels, test, k, num_classes, T=temperature, metric="cosine")
            means = nearest_mean_predict(support, support_labels, test, num_classes)
            results["1-NN"][k_shot].append(accuracy(one))
            results["k-NN"][k_shot].append(accuracy(weighted))
            results["class mean"][k_shot].append(accuracy(means))
    return results


def confidence_interval(values: Sequence[float], z: float = Z_95) -> tuple[float, float]:
    """``(mean, half_width)`` of the normal-approximation confidence interval of the mean of ``values``:
    ``half_width = z * s / sqrt(n)``, ``s`` the sample standard deviation (``ddof=1``); NaN when ``n < 2``."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values")
    if x.size < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(z * x.std(ddof=1) / math.sqrt(x.size))


def summarize_accuracies(values: Sequence[float]) -> dict:
    """``{"mean", "ci95", "std", "episodes", "accuracies"}`` of a list of episode accuracies (NaN → None)."""
    mean, half = confidence_interval(values)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return {
        "mean": mean,
        "ci95": None if math.isnan(half) else half,
        "std": None if math.isnan(std) else std,
        "episodes": len(values),
        "accuracies": [float(v) for v in values],
    }


def subsample_indices(n: int, max_n: int | None, seed: int = 0) -> torch.Tensor | None:
    """Sorted indices of a seeded random subset of ``max_n`` of ``n`` samples, or None for "all" (quick runs)."""
    if max_n is None or max_n >= n:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:max_n].sort().values


# --------------------------------------------------------------------------------------------------------------------
# linear probe
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class LinearProbeResult:
    """Test top-1/top-5 (%) of the refitted classifier, the chosen weight decay, and hold-out top-1 per candidate."""

    top1: float
    top5: float
    weight_decay: float
    holdout_top1: dict[float, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "weight_decay": self.weight_decay,
            "holdout_top1": {f"{wd:g}": acc for wd, acc in self.holdout_top1.items()},
        }


def train_logistic_regression(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W [C, D], b [C])`` minimising ``mean CE(x W^T + b, y) + weight_decay / 2 * ||W||^2``: one linear head
    from zero in float64, one full-batch L-BFGS step (strong-Wolfe line search) of the linear-probe trainer
    :func:`utils.eval.linear_probe.train_epoch`; the bias is not penalised."""
    x = x.double()
    y = y.long().to(x.device)
    grid = LinearClassifierGrid(x.shape[1], num_classes, n_heads=1).to(device=x.device, dtype=torch.float64)
    head = grid.heads[0].linear
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    optimizer = torch.optim.LBFGS(
        grid.parameters(),
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * 2,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    with torch.enable_grad():
        train_epoch(grid, optimizer, [(x, y)], penalty=lambda: 0.5 * weight_decay * head.weight.pow(2).sum())
    return head.weight.detach(), head.bias.detach()


def _topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return 100.0 * (top == labels[:, None]).any(dim=1).double().mean().item()


def _stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(fit, holdout)`` indices with ``round(fraction * n_c)`` (at least 1) samples of each class held out, or
    None when some class has fewer than 2 samples."""
    rng = np.random.default_rng([seed, 7919])
    fit, hold = [], []
    for c in np.unique(labels):
        pool = rng.permutation(np.flatnonzero(labels == c))
        if pool.size < 2:
            return None
        n_hold = min(pool.size - 1, max(1, round(fraction * pool.size)))
        hold.append(pool[:n_hold])
        fit.append(pool[n_hold:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(hold))


@torch.no_grad()
def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    weight_decays: Sequence[float] = (1e-5, 1e-4, 1e-3, 1e-2),
    holdout_fraction: float = 0.2,
    max_iter: int = 500,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> LinearProbeResult:
    """Logistic-regression probe (see the module docstring): choose the weight decay on a hold-out part of the
    training set (when there are several candidates and every class has >= 2 samples; otherwise the first
    candidate), refit on all training samples, and return its test accuracy."""
    if not weight_decays:
        raise ValueError("no weight decay candidates")
    device = torch.device(device)
    train = train_features.double().to(device)
    mean, std = train.mean(dim=0), train.std(dim=0, unbiased=False).clamp_min(1e-6)
    train = (train - mean) / std
    test = (test_features.double().to(device) - mean) / std
    train_labels, test_labels = train_labels.long().to(device), test_labels.long().to(device)

    holdout: dict[float, float] = {}
    chosen = float(weight_decays[0])
    split = _stratified_holdout(train_labels.cpu().numpy(), holdout_fraction, seed) if len(weight_decays) > 1 else None
    if split is not None:
        fit, hold = (torch.from_numpy(s).to(device) for s in split)
        for wd in weight_decays:
            w, b = train_logistic_regression(train[fit], train_labels[fit], num_classes, float(wd), max_iter)
            holdout[float(wd)] = _topk_accuracy(F.linear(train[hold], w, b), train_labels[hold], 1)
        chosen = max(holdout, key=lambda wd: (holdout[wd], wd))
    w, b = train_logistic_regression(train, train_labels, num_classes, chosen, max_iter)
    logits = F.linear(test, w, b)
    return LinearProbeResult(
        top1=_topk_accuracy(logits, test_labels, 1),
        top5=_topk_accuracy(logits, test_labels, 5),
        weight_decay=chosen,
        holdout_top1=holdout,
    )


# --------------------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------------------


def _pm(stats: dict) -> str:
    half = stats["ci95"]
    return f"{stats['mean']:6.2f} ± {half:5.2f}" if half is not None else f"{stats['mean']:6.2f}        "


def format_report(results: dict) -> str:
    """The console tables of an ``eval_stl10.py`` results dict (k-NN, linear probe, few-shot)."""
    lines = []
    knn = results.get("knn")
    if knn:
        lines.append(f"k-NN on the full training set (T={knn['temperature']}), top-1 / top-5 %:")
        ks = sorted({int(k) for variant in knn["variants"].values() for k in variant}, key=int)
        lines.append("  " + f"{'':<20}" + "".join(f"{'k=' + str(k):>18}" for k in ks))
        for name, variant in knn["variants"].items():
            cells = []
            for k in ks:
                r = variant.get(str(k))
                cells.append(f"{r['top1']:6.2f} / {r['top5']:6.2f}" if r else "-")
            lines.append("  " + f"{name:<20}" + "".join(f"{c:>18}" for c in cells))
        if knn.get("skipped"):
            lines.append(f"  skipped k > number of training samples: {', '.join(map(str, knn['skipped']))}")
    linear = results.get("linear")
    if linear:
        lines.append(
            f"linear probe (logistic regression, weight decay {linear['weight_decay']:g}): "
            f"top-1 {linear['top1']:.2f}%  top-5 {linear['top5']:.2f}%"
        )
    fewshot = results.get("fewshot")
    if fewshot:
        shots = fewshot["shots"]
        lines.append(
            f"few-shot top-1 % (mean ± 95% CI over {fewshot['episodes']} episodes, full test set, "
            f"k-NN k=min({fewshot['knn_k']}, K*C)):"
        )
        lines.append("  " + f"{'':<12}" + "".join(f"{'K=' + str(k):>17}" for k in shots))
        for method, per_k in fewshot["methods"].items():
            lines.append("  " + f"{method:<12}" + "".join(f"{_pm(per_k[str(k)]):>17}" for k in shots))
    return "\n".join(lines)


def plot_fewshot(
    methods: dict[str, dict[str, dict]],
    shots: Sequence[int],
    path,
    title: str,
    subtitle: str = "",
    references: dict[str, float] | None = None,
    chance: float | None = None,
    method_labels: dict[str, str] | None = None,
) -> Path:
    """Few-shot accuracy vs ``K`` as a PNG: one line per method with 95 % CI error bars, a log x axis ticked at
    the shot counts, optional horizontal reference lines (e.g. full-data linear probe / k-NN) and chance level.

    ``methods`` is ``{method: {str(K): {"mean", "ci95", ...}}}`` (the ``fewshot.methods`` part of the results);
    ``method_labels`` optionally renames methods in the legend.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    path = Path(path)
    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    ax = fig.subplots()
    shots = sorted(shots)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    markers = ["o", "s", "^", "D", "v"]
    n = len(methods)
    spread = 1.035  # methods are shifted slightly along the log x axis so that error bars do not overlap
    for i, (method, per_k) in enumerate(methods.items()):
        shift = spread ** (i - (n - 1) / 2)
        means = [per_k[str(k)]["mean"] for k in shots]
        errors = [per_k[str(k)]["ci95"] or 0.0 for k in shots]
        ax.errorbar(
            [k * shift for k in shots],
            means,
            yerr=errors,
            label=(method_labels or {}).get(method, method),
            color=colors[i % len(colors)],
            marker=markers[i % len(markers)],
            markersize=6,
            linewidth=2,
            capsize=4,
            capthick=1.5,
        )
        ax.annotate(
            f"{means[-1]:.1f}",
            (shots[-1] * shift, means[-1]),
            xytext=(8, 0),
            textcoords="offset points",
            va="center",
            fontsize=9,
            color=colors[i % len(colors)],
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85},
        )
    ref_styles = ["--", "-."]
    for j, (name, value) in enumerate((references or {}).items()):
        style = ref_styles[j % len(ref_styles)]
        ax.axhline(value, color="0.35", linestyle=style, linewidth=1.2, label=f"{name} ({value:.1f}%)")
    lowest = min(s["mean"] - (s["ci95"] or 0.0) for per_k in methods.values() for s in per_k.values())
    if chance is not None and lowest < chance + 20:  # only when near chance: otherwise it squashes the lines
        ax.axhline(chance, color="0.6", linestyle=":", linewidth=1.2, label=f"chance ({chance:.0f}%)")
    ax.set_xscale("log")
    ax.set_xticks(shots)
    ax.set_xticklabels([str(k) for k in shots])
    ax.minorticks_off()
    if len(shots) > 1:
        ax.set_xlim(shots[0] / 1.25, shots[-1] * 1.35)
    else:
        ax.set_xlim(shots[0] / 1.5, shots[0] * 1.6)
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(0.0, lo), min(100.0, hi + 0.04 * (hi - lo)))
    ax.set_xlabel("labelled training images per class (K)")
    ax.set_ylabel("top-1 accuracy on the test set (%)")
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize=9, framealpha=0.9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path
