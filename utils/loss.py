"""The DINO loss: cross-entropy between the sharpened, centred teacher and the student, over pairs of views."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from utils.distributed import all_reduce_sum, get_world_size
from utils.schedules import teacher_temperature_schedule


class DINOLoss(nn.Module):
    """DINO's self-distillation loss, with the official constructor and ``forward(student, teacher, epoch)``.

    ``student_output``: ``[ncrops * B, D]`` logits, crop-major (all global crops first, then the local ones);
    ``teacher_output``: ``[2 * B, D]`` logits of the two global crops. The teacher's distribution is
    ``softmax((t - center) / temp)`` with ``temp`` warmed up linearly over ``warmup_teacher_temp_epochs``; the
    student's is ``log_softmax(s / student_temp)``. The loss is the mean over every (teacher view ``i``, student
    view ``v != i``) pair of the batch-mean cross-entropy. The centre is then updated by an EMA of the teacher's
    batch mean, summed across processes. All pairs are computed at once, as one ``[2, V]`` matrix product.

    After each call ``last_stats`` holds detached collapse indicators: the entropy (nats) of the teacher's mean
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
    ):
        super().__init__()
        self.out_dim = out_dim
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temperature_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs
        )
        self.last_stats: dict[str, torch.Tensor] = {}

    def teacher_temp(self, epoch: int) -> float:
        return float(self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)])

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        student_output, teacher_output = student_output.float(), teacher_output.float()
        n_teacher = teacher_output.shape[0] // (student_output.shape[0] // self.ncrops)
        student_logp = F.log_softmax(student_output / self.student_temp, dim=-1)
        teacher_p = F.softmax((teacher_output - self.center) / self.teacher_temp(epoch), dim=-1).detach()
        # cross[i, v] = -sum over batch and classes of p_teacher_i * log p_student_v, divided by B.
        batch = teacher_p.shape[0] // n_teacher
        cross = -(teacher_p.reshape(n_teacher, -1) @ student_logp.reshape(self.ncrops, -1).T) / batch
        same_view = torch.eye(n_teacher, self.ncrops, dtype=torch.bool, device=cross.device)
        loss = cross.masked_fill(same_view, 0.0).sum() / (n_teacher * self.ncrops - n_teacher)
        self.last_stats = collapse_stats(teacher_p)
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the teacher's batch mean over all processes; a non-finite batch leaves the centre unchanged."""
        batch_center = all_reduce_sum(teacher_output.sum(dim=0, keepdim=True))
        batch_center = batch_center / (teacher_output.shape[0] * get_world_size())
        new_center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        self.center.copy_(torch.where(torch.isfinite(new_center).all(), new_center, self.center))


@torch.no_grad()
def collapse_stats(teacher_p: torch.Tensor) -> dict[str, torch.Tensor]:
    """Entropies (nats) of the teacher's mean distribution and, averaged, of its per-sample ones. ``[N, D]`` → 0-d."""
    mean_p = teacher_p.mean(dim=0)
    return {
        "teacher_mean_entropy": -(mean_p * torch.log(mean_p.clamp_min(1e-12))).sum(),
        "teacher_sample_entropy": -(teacher_p * torch.log(teacher_p.clamp_min(1e-12))).sum(dim=-1).mean(),
    }


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
