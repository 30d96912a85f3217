import numpy as np
import pytest
import torch
import torch.nn.functional as F

from main_dino import DINOLoss


class ReferenceDINOLoss:
    """The loss written plainly: a loop over (teacher view, student view) pairs, numpy for the centre."""

    def __init__(self, out_dim, ncrops, warm_temp, temp, warm_epochs, nepochs, student_temp=0.1, momentum=0.9):
        self.ncrops, self.student_temp, self.momentum = ncrops, student_temp, momentum
        self.center = np.zeros((1, out_dim))
        self.temps = [warm_temp + (temp - warm_temp) * e / (warm_epochs - 1) for e in range(warm_epochs)]
        self.temps += [temp] * (nepochs - warm_epochs)

    def __call__(self, student, teacher, epoch):
        student_views = (student / self.student_temp).chunk(self.ncrops)
        t = (teacher.double() - torch.from_numpy(self.center)) / self.temps[epoch]
        teacher_views = F.softmax(t, dim=-1).chunk(2)
        total, terms = 0.0, 0
        for iq, q in enumerate(teacher_views):
            for v, s in enumerate(student_views):
                if v == iq:
                    continue
                total += torch.sum(-q * F.log_softmax(s.double(), dim=-1), dim=-1).mean().item()
                terms += 1
        batch_center = teacher.double().numpy().mean(axis=0, keepdims=True)
        self.center = self.center * self.momentum + batch_center * (1 - self.momentum)
        return total / terms


def test_dino_loss_matches_pairwise_reference_over_warmup():
    torch.manual_seed(0)
    out_dim, ncrops, batch, epochs = 64, 6, 5, 6
    ours = DINOLoss(out_dim, ncrops, 0.04, 0.07, 4, epochs)
    reference = ReferenceDINOLoss(out_dim, ncrops, 0.04, 0.07, 4, epochs)
    for epoch in range(epochs):
        student = torch.randn(ncrops * batch, out_dim) * 3
        teacher = torch.randn(2 * batch, out_dim) * 3 + 1.0
        value = ours(student, teacher, epoch)
        expected = reference(student, teacher, epoch)
        assert abs(value.item() - expected) < 1e-4 * max(1.0, abs(expected))
        np.testing.assert_allclose(ours.center.numpy(), reference.center, rtol=1e-5, atol=1e-6)


def test_dino_loss_gradient_flows_to_student_only():
    loss_fn = DINOLoss(16, 4, 0.04, 0.04, 0, 2)
    student = torch.randn(4 * 3, 16, requires_grad=True)
    teacher = torch.randn(2 * 3, 16, requires_grad=True)
    loss_fn(student, teacher, 0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_collapse_indicators_on_uniform_and_peaked_teacher():
    loss_fn = DINOLoss(32, 2, 0.04, 0.04, 0, 1)
    stats = loss_fn.forward_with_stats(torch.randn(4, 32), torch.zeros(4, 32), 0)  # all-equal logits: uniform
    assert abs(stats.teacher_mean_entropy.item() - np.log(32)) < 1e-4
    assert abs(stats.teacher_sample_entropy.item() - np.log(32)) < 1e-4
    peaked = torch.zeros(4, 32)
    peaked[:, 3] = 100.0
    loss_fn = DINOLoss(32, 2, 0.04, 0.04, 0, 1)
    stats = loss_fn.forward_with_stats(torch.randn(4, 32), peaked, 0)
    assert stats.teacher_mean_entropy.item() < 1e-3


def test_forward_is_the_loss_of_forward_with_stats():
    student, teacher = torch.randn(6, 16), torch.randn(6, 16)
    plain, with_stats = DINOLoss(16, 3, 0.04, 0.04, 0, 1), DINOLoss(16, 3, 0.04, 0.04, 0, 1)
    assert torch.equal(plain(student, teacher, 0), with_stats.forward_with_stats(student, teacher, 0).loss)
    assert torch.equal(plain.center, with_stats.center)


def test_non_finite_teacher_batch_leaves_centre_unchanged():
    loss_fn = DINOLoss(8, 2, 0.04, 0.04, 0, 1)
    loss_fn(torch.randn(4, 8), torch.randn(4, 8), 0)
    before = loss_fn.center.clone()
    teacher = torch.randn(4, 8)
    teacher[0, 0] = float("nan")
    loss_fn(torch.randn(4, 8), teacher, 0)
    assert torch.equal(loss_fn.center, before)


# ------------------------------------------------------------------------------------ Sinkhorn-Knopp
def _dinov2_sinkhorn_reference(teacher_output, temp, n_iterations=3):
    """DINOv2's ``sinkhorn_knopp_teacher`` (one process) written out: linear space, float64, ``Q`` prototype-major."""
    q = torch.exp(teacher_output.double() / temp).t()  # [K, B]
    n_samples, n_prototypes = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= n_samples
    q *= n_samples
    return q.t()


@pytest.mark.parametrize("n_iterations", [1, 3, 7])
def test_sinkhorn_knopp_equals_dinov2_rule(n_iterations):
    from utils.train.loss import sinkhorn_knopp

    teacher = torch.randn(12, 20, generator=torch.Generator().manual_seed(n_iterations))
    ours = sinkhorn_knopp(teacher, 0.07, n_iterations)
    expected = _dinov2_sinkhorn_reference(teacher, 0.07, n_iterations)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ours.sum(dim=1), torch.ones(12))


def test_sinkhorn_knopp_balances_prototypes_even_where_exp_underflows():
    """At temperature 0.02 the logits span 250 nats: prototype 0's ``exp`` underflows to 0 in float32 for every
    sample, so a linear-space rescaling leaves it at mass 0 (or NaN). Sinkhorn-Knopp's fixed point gives every
    prototype the same total mass, ``N / D``."""
    from utils.train.loss import sinkhorn_knopp

    teacher = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)) * 0.1
    teacher[:, 0] -= 5.0
    assert torch.exp(teacher.float() / 0.02)[:, 0].max() == 0  # the underflow this test is about
    q = sinkhorn_knopp(teacher, 0.02, n_iterations=200)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(16))
    torch.testing.assert_close(q.sum(dim=0), torch.full((8,), 2.0), rtol=1e-3, atol=1e-3)


def test_dino_loss_with_sinkhorn_knopp_uses_its_targets_and_leaves_the_centre():
    torch.manual_seed(0)
    out_dim, ncrops, batch = 32, 4, 6
    loss_fn = DINOLoss(out_dim, ncrops, 0.04, 0.07, 2, 4, centering="sinkhorn_knopp")
    student, teacher = torch.randn(ncrops * batch, out_dim) * 3, torch.randn(2 * batch, out_dim) * 3 + 1.0
    value = loss_fn(student, teacher, 3)  # after the warmup: temperature 0.07
    targets = _dinov2_sinkhorn_reference(teacher, 0.07).chunk(2)
    log_p = F.log_softmax(student.double() / 0.1, dim=-1).chunk(ncrops)
    pairs = [(i, v) for i in range(2) for v in range(ncrops) if v != i]
    expected = sum(-(targets[i] * log_p[v]).sum(dim=-1).mean() for i, v in pairs) / len(pairs)
    assert abs(value.item() - expected.item()) < 1e-4 * abs(expected.item())
    assert torch.equal(loss_fn.center, torch.zeros(1, out_dim))
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(out_dim, ncrops, 0.04, 0.07, 2, 4, centering="sinkhorn")


# ------------------------------------------------------------------------------------------------ KoLeo
def _koleo_reference(features: np.ndarray, eps: float = 1e-8) -> float:
    """Plain loops: -mean over samples of log(distance to the nearest other sample), on L2-normalised rows."""
    z = features / np.linalg.norm(features, axis=1, keepdims=True)
    total = 0.0
    for i in range(len(z)):
        nearest = min(np.linalg.norm(z[i] - z[j]) for j in range(len(z)) if j != i)
        total += np.log(nearest + eps)
    return -total / len(z)


def test_koleo_loss_equals_a_looped_reference():
    from utils.train.loss import koleo_loss

    features = torch.randn(17, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert float(koleo_loss(features)) == pytest.approx(_koleo_reference(features.numpy()), rel=1e-6)


def test_koleo_loss_is_lower_for_spread_features_and_its_gradient_spreads_them():
    from utils.train.loss import koleo_loss

    angles = torch.tensor([0.0, 0.5, 1.0, 1.5]) * torch.pi  # 4 points evenly on the circle
    spread = torch.stack([angles.cos(), angles.sin()], dim=1)
    clustered = torch.stack([(angles * 0.1).cos(), (angles * 0.1).sin()], dim=1)
    assert float(koleo_loss(spread)) < float(koleo_loss(clustered))
    bunched = torch.randn(12, 16, generator=torch.Generator().manual_seed(0)) * 0.1 + 1.0  # one tight cluster
    x = bunched.clone().requires_grad_(True)
    koleo_loss(x).backward()
    with torch.no_grad():
        assert float(koleo_loss(x - 0.01 * x.grad)) < float(koleo_loss(bunched))  # a descent step spreads them


# ------------------------------------------------------------------------------------------------ closed forms
@pytest.mark.parametrize("ncrops,n_teacher", [(4, 2), (2, 2), (6, 2), (3, 1)])
def test_cross_entropy_gradient_equals_autograd_of_the_pairwise_loop(ncrops, n_teacher):
    """The closed-form backward of ``dino_cross_entropy`` == autograd through the plain pairwise loop (float64),
    with an upstream gradient other than 1; and it passes finite differences."""
    from utils.train.loss import dino_cross_entropy

    generator = torch.Generator().manual_seed(ncrops)
    batch, dim, temp = 3, 11, 0.1
    student = (torch.randn(ncrops * batch, dim, dtype=torch.float64, generator=generator) * 3).requires_grad_()
    teacher_p = F.softmax(torch.randn(n_teacher * batch, dim, dtype=torch.float64, generator=generator) * 4, dim=-1)
    loss = dino_cross_entropy(student, teacher_p, ncrops, temp)
    (grad,) = torch.autograd.grad(2.5 * loss, [student])

    views, targets = (student / temp).chunk(ncrops), teacher_p.chunk(n_teacher)
    terms = [
        torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
        for i, q in enumerate(targets)
        for v, s in enumerate(views)
        if v != i
    ]
    expected_loss = torch.stack(terms).mean()
    (expected,) = torch.autograd.grad(2.5 * expected_loss, [student])
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda s: dino_cross_entropy(s, teacher_p, ncrops, temp), (student,))


def test_sample_entropy_from_logits_equals_the_definition():
    from utils.train.loss import collapse_stats

    logits = torch.randn(6, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 20
    p = F.softmax(logits, dim=-1)
    from_logits, plain = collapse_stats(p, logits), collapse_stats(p)
    expected = -(p * torch.log(p)).sum(dim=-1).mean()  # no zero probabilities at this scale in float64
    torch.testing.assert_close(from_logits.sample_entropy, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(plain.sample_entropy, expected, rtol=1e-10, atol=1e-12)
    assert from_logits.mean_entropy == plain.mean_entropy


def test_loss_is_computed_in_float32_under_autocast():
    """Mixed precision must not reach the loss's matrix products: under bf16 autocast the loss and its gradient
    equal the float32 ones (bf16 products would be off by ~1e-2 relative)."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(4 * 16, 512, generator=generator) * 3
    teacher = torch.randn(2 * 16, 512, generator=generator) * 3
    results = []
    for autocast in (False, True):
        x = student.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = DINOLoss(512, 4, 0.04, 0.04, 0, 1)(x, teacher, 0)
        loss.backward()
        results.append((loss.detach(), x.grad))
    assert results[1][0].dtype == torch.float32
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-6, atol=1e-9)
