"""The DINO loss: cross-entropy between the sharpened, centred teacher and the student, over pairs of views."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from utils.runtime.distributed import all_reduce_max, all_reduce_sum, get_world_size
from utils.train.schedules import teacher_temperature_schedule

CENTERINGS = ("centering", "sinkhorn_knopp")


class DINOLoss(nn.Module):
    """DINO's self-distillation loss, with the official constructor and ``forward(student, teacher, epoch)``.

    ``student_output``: ``[ncrops * B, D]`` logits, crop-major (all global crops first, then the local ones);
    ``teacher_output``: ``[2 * B, D]`` logits of the two global crops. The teacher's distribution is
    ``softmax((t - center) / temp)`` with ``temp`` warmed up linearly over ``warmup_teacher_temp_epochs``; the
    student's is ``log_softmax(s / student_temp)``. The loss is the mean over every (teacher view ``i``, student
    view ``v != i``) pair of the batch-mean cross-entropy (:func:`dino_cross_entropy`: all pairs at once, as one
    ``[2, V]`` matrix product, and a closed-form gradient). The centre is then updated by an EMA of the teacher's
    batch mean, summed across processes. With ``centering="sinkhorn_knopp"`` (DINOv2's option) the teacher's
    distribution is instead :func:`sinkhorn_knopp` of ``t / temp`` over the whole global batch (both global crops of
    every process): each sample's targets sum to 1 and every prototype gets about the same total mass; the centre is
    then neither used nor updated. The loss runs in float32 under autocast too (its matrix products sum over
    ``B * D`` products: in bf16/fp16 the cross terms would lose 2-3 digits).

    :meth:`forward_with_stats` also returns detached collapse indicators: the entropy (nats) of the teacher's mean
    distribution (``log D`` when uniform, 0 when constant) and the mean entropy of its per-sample distributions.
    """

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "centering",
        sinkhorn_iterations: int = 3,
    ):
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS} (got {centering!r})")
        self.centering, self.sinkhorn_iterations = centering, sinkhorn_iterations
        self.out_dim = out_dim
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temperature_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs
        )

    def teacher_temp(self, epoch: int) -> float:
        return float(self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)])

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        """The loss (0-d); updates the centre."""
        return self.forward_with_stats(student_output, teacher_output, epoch).loss

    def forward_with_stats(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> LossStats:
        """The loss and the teacher's collapse indicators; updates the centre."""
        with torch.autocast(student_output.device.type, enabled=False):  # float32 throughout, matrix products too
            student_output, teacher_output = student_output.float(), teacher_output.float()
            with torch.no_grad():
                if self.centering == "sinkhorn_knopp":
                    teacher_p = sinkhorn_knopp(teacher_output, self.teacher_temp(epoch), self.sinkhorn_iterations)
                    mean_entropy, sample_entropy = collapse_stats(teacher_p)
                else:
                    teacher_logits = (teacher_output - self.center).div_(self.teacher_temp(epoch))
                    teacher_p = F.softmax(teacher_logits, dim=-1)
                    mean_entropy, sample_entropy = collapse_stats(teacher_p, teacher_logits)
            loss = dino_cross_entropy(student_output, teacher_p, self.ncrops, self.student_temp)
            if self.centering == "centering":
                self.update_center(teacher_output)
        return LossStats(loss=loss, teacher_mean_entropy=mean_entropy, teacher_sample_entropy=sample_entropy)

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the teacher's batch mean over all processes; a non-finite batch leaves the centre unchanged."""
        batch_center = all_reduce_sum(teacher_output.sum(dim=0, keepdim=True))
        batch_center = batch_center / (teacher_output.shape[0] * get_world_size())
        new_center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        self.center.copy_(torch.where(torch.isfinite(new_center).all(), new_center, self.center))


@torch.no_grad()
def sinkhorn_knopp(teacher_output: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """DINOv2's Sinkhorn-Knopp teacher targets: ``[N, D]`` logits → ``[N, D]`` float32 probabilities (rows sum to 1).

    Starting from ``Q = exp(t / temp)`` normalised to total mass 1 over the global batch (all ``N * world_size``
    rows of every process), each of the ``n_iterations`` rounds rescales every prototype (column) to mass ``1 / D``,
    then every sample (row) to mass ``1 / (N * world_size)``; the result is scaled by ``N * world_size`` so that each
    row is a distribution. Column sums are taken over every process, so the targets are those one process would
    compute on the whole global batch. Computed in log space: at a low temperature a prototype's ``exp`` can
    underflow to 0 for every sample, which a linear-space rescaling could not raise back to mass ``1 / D``."""
    log_q = teacher_output.float() / temp
    rows = log_q.shape[0] * get_world_size()
    log_q -= _global_logsumexp(log_q.flatten())
    for _ in range(n_iterations):
        log_q -= _global_logsumexp(log_q, dim=0) + math.log(log_q.shape[1])
        log_q -= torch.logsumexp(log_q, dim=1, keepdim=True) + math.log(rows)
    return torch.exp(log_q + math.log(rows))


def _global_logsumexp(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``logsumexp`` along ``dim`` over the rows of every process (``dim`` kept); the local result alone."""
    peak = all_reduce_max(x.amax(dim=dim, keepdim=True))
    return peak + torch.log(all_reduce_sum(torch.exp(x - peak).sum(dim=dim, keepdim=True)))


class LossStats(NamedTuple):
    """:meth:`DINOLoss.forward_with_stats`'s result: the loss and the teacher's collapse indicators (0-d tensors)."""

    loss: torch.Tensor
    teacher_mean_entropy: torch.Tensor  # nats; log D when the teacher's mean output is uniform, 0 when constant
    teacher_sample_entropy: torch.Tensor  # nats; mean over samples; log D when every output is uniform


class CollapseStats(NamedTuple):
    """:func:`collapse_stats`'s result (0-d tensors, nats)."""

    mean_entropy: torch.Tensor
    sample_entropy: torch.Tensor


@torch.no_grad()
def collapse_stats(teacher_p: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> CollapseStats:
    """Entropies (nats) of the teacher's mean distribution and, averaged, of its per-sample ones. ``[N, D]`` → 0-d.

    With the logits ``z`` that ``teacher_p = softmax(z)`` came from, a sample's entropy is ``logsumexp(z) - p . z``,
    and ``logsumexp(z) = max z - log max p`` (softmax is monotonic: both maxima sit at the same index, where ``p`` is
    at least ``1 / D``): read-only passes instead of forming ``log p``."""
    mean_p = teacher_p.mean(dim=0)
    if teacher_logits is None:
        sample_entropy = -(teacher_p * torch.log(teacher_p.clamp_min(1e-12))).sum(dim=-1)
    else:
        log_normaliser = teacher_logits.amax(dim=-1) - torch.log(teacher_p.amax(dim=-1))
        sample_entropy = log_normaliser - torch.linalg.vecdot(teacher_p, teacher_logits)
    return CollapseStats(
        mean_entropy=-(mean_p * torch.log(mean_p.clamp_min(1e-12))).sum(), sample_entropy=sample_entropy.mean()
    )


def dino_cross_entropy(
    student_output: torch.Tensor, teacher_p: torch.Tensor, ncrops: int, student_temp: float
) -> torch.Tensor:
    """DINO's cross-entropy over every (teacher view ``i``, student view ``v != i``) pair, averaged over pairs and
    over the batch: ``-mean_pairs mean_b sum_d q_i[b, d] log softmax(s_v[b] / student_temp)[d]``.

    ``student_output``: ``[V * B, D]`` logits, view-major; ``teacher_p``: ``[T * B, D]`` probabilities (no gradient),
    the ``T`` teacher views being the first ``T`` student views. Returns a 0-d tensor whose gradient with respect to
    the student is computed in one closed form (:class:`_DINOCrossEntropy`).
    """
    return _DINOCrossEntropy.apply(student_output.contiguous(), teacher_p.detach().contiguous(), ncrops, student_temp)


class _DINOCrossEntropy(torch.autograd.Function):
    """Forward: one softmax of the student's scaled logits ``z = s / tau`` and two ``[T, V]`` matrix products, the
    cross terms being ``sum q_i . log p_v = sum q_i . z_v - sum_b (sum_d q_i[b]) lse_v[b]`` with the row-wise
    ``lse = logsumexp(z) = max z - log max p`` (see :func:`collapse_stats`). Backward, for an upstream ``g``:

    ``d loss / d s_v[b] = g / (tau * B * P) * (m_v[b] * p_v[b] - Q_v[b])``

    with ``P`` the number of pairs, ``Q_v = sum_{i != v} q_i`` and ``m_v[b] = sum_d Q_v[b, d]`` (1 or 2 up to
    rounding): a product and one ``addmm`` over the student's outputs, from the saved softmax (autograd's
    log-softmax path takes three passes and a second ``exp``)."""

    @staticmethod
    def forward(ctx, student_output, teacher_p, ncrops, student_temp):
        n_views, batch = ncrops, student_output.shape[0] // ncrops
        n_teacher = teacher_p.shape[0] // batch
        logits = student_output * (1.0 / student_temp)
        p = F.softmax(logits, dim=-1)
        lse = logits.amax(dim=-1) - torch.log(p.amax(dim=-1))  # [V * B]
        teacher_mass = teacher_p.sum(dim=-1).view(n_teacher, batch)  # sum_d q_i[b]: 1 up to rounding
        cross = teacher_p.view(n_teacher, -1) @ logits.view(n_views, -1).T  # [T, V], summed over b and d
        cross -= teacher_mass @ lse.view(n_views, batch).T
        pairs = 1.0 - torch.eye(n_teacher, n_views, dtype=p.dtype, device=p.device)  # [T, V]
        scale = 1.0 / (batch * (n_teacher * n_views - min(n_teacher, n_views)))
        ctx.save_for_backward(p, teacher_p, teacher_mass, pairs)
        ctx.scale, ctx.student_temp = scale, student_temp
        return -(cross * pairs).sum() * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        p, teacher_p, teacher_mass, pairs = ctx.saved_tensors
        n_teacher, n_views = pairs.shape
        coef = grad_loss * (ctx.scale / ctx.student_temp)
        mass = pairs.T @ teacher_mass  # [V, B]
        grad = torch.mul(p.view(n_views, mass.shape[1], -1), (mass * coef).unsqueeze(-1)).view_as(p)
        grad.view(n_views, -1).addmm_(pairs.T * coef, teacher_p.view(n_teacher, -1), alpha=-1)
        return grad, None, None, None


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo regulariser: ``-mean_i log(min_{j != i} ||z_i - z_j||)`` over the L2-normalised rows ``z`` of
    ``features`` ``[N, D]`` (``N >= 2``), the Kozachenko-Leonenko estimator of the differential entropy up to
    constants. Minimising it pushes every sample away from its nearest neighbour: the features spread over the
    sphere instead of collapsing onto a few directions. Returns a 0-d tensor (float32 or wider)."""
    z = F.normalize(features.float(), dim=-1)
    similarity = z @ z.T
    similarity.fill_diagonal_(-2.0)  # below any real cosine: a sample is not its own neighbour
    nearest = similarity.argmax(dim=1)
    distance = F.pairwise_distance(z, z[nearest], eps=0.0)
    return -torch.log(distance + eps).mean()
