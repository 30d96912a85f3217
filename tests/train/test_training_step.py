import torch

from benchmarks.reference_step import (
    looped_dino_loss,
    reference_optimizer,
    reference_train_step,
    use_official_last_layer,
)
from tests.conftest import run_benchmark_quick
from tests.helpers import random_crops as batches
from tests.helpers import tiny_dino_models as models
from utils.train.loss import DINOLoss
from utils.train.optim import build_optimizer, get_params_groups
from utils.train.step import DINOState, StepSchedule, train_step


def test_lean_step_equals_the_official_structure(monkeypatch):
    """Fused AdamW + foreach EMA + vectorised loss + device-side skip + our fused last layer == per-tensor AdamW +
    looped loss and EMA + the official last layer (``nn.utils.weight_norm``).

    Adam's update is about lr * sign(grad) for gradients far below its eps, so the float noise of gradients that
    are zero in exact arithmetic (the key biases: softmax ignores them) would decide a whole lr-sized step in each
    path. A larger eps (1e-3, in both) makes such updates proportional to the gradient again: then every element of
    both paths must agree. The last layer's blocks are made 5 rows (of 64) so that its blockwise path runs over
    several blocks and a remainder.
    """
    monkeypatch.setattr("utils.model.weight_norm.CPU_BLOCK_BYTES", 5 * 256 * 4)
    lean_student, lean_teacher = models()
    ref_student, ref_teacher = (use_official_last_layer(m) for m in models())
    lean_loss, ref_loss = DINOLoss(64, 4, 0.04, 0.07, 2, 5), DINOLoss(64, 4, 0.04, 0.07, 2, 5)
    state = DINOState(
        student=lean_student,
        teacher=lean_teacher,
        student_module=lean_student,
        loss=lean_loss,
        optimizer=build_optimizer("adamw", get_params_groups(lean_student)),
        scaler=None,
        device=torch.device("cpu"),
        clip_grad=0.3,
        freeze_last_layer=1,
    )
    assert state.skips_on_device  # the fused path is the one under test
    ref_optimizer = reference_optimizer(get_params_groups(ref_student))
    for group in (*state.optimizer.param_groups, *ref_optimizer.param_groups):
        group["eps"] = 1e-3
    for epoch, crops in enumerate(batches(3)):
        schedule = StepSchedule(lr=2e-3, weight_decay=0.04, momentum=0.95)
        values = train_step(state, crops, epoch, schedule)
        ref_value = reference_train_step(
            ref_student, ref_teacher, ref_loss, ref_optimizer, crops, epoch, 2e-3, 0.04, 0.95, 0.3, 1
        )
        assert abs(values.loss.item() - ref_value) < 1e-4
    for lean, ref in ((lean_student, ref_student), (lean_teacher, ref_teacher)):
        for name, value in lean.state_dict().items():
            torch.testing.assert_close(value, ref.state_dict()[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(lean_loss.center, ref_loss.center)


def test_looped_reference_loss_equals_vectorised_loss():
    torch.manual_seed(0)
    a, b = DINOLoss(32, 5, 0.04, 0.04, 0, 1), DINOLoss(32, 5, 0.04, 0.04, 0, 1)
    student, teacher = torch.randn(15, 32), torch.randn(6, 32)
    torch.testing.assert_close(a(student, teacher, 0), looped_dino_loss(b, student, teacher, 0))


def test_train_step_benchmark_quick_mode_emits_valid_json(tmp_path):
    report, _ = run_benchmark_quick("bench_train_step.py", ["--threads", "1"], tmp_path / "step.json")
    for key in (
        "lean_step_s",
        "official_step_s",
        "images_per_s",
        "outside_backbone_speedup",
        "outside_backbone_derived_speedup",
        "flops_per_step",
        "matmul_peak_gflops",
        "fraction_of_peak",
        "official_phases_s",
    ):
        assert key in report
    assert report["flops_per_step"] > 0 and report["images_per_s"]["lean"] > 0
    outside = report["outside_backbone_s"]  # measured with the backbones cached: every repeat of both paths
    assert len(outside["lean"]["all"]) == len(outside["official"]["all"]) == 2 * report["config"]["repeats"]
    assert outside["lean"]["median"] < report["lean_step_s"]["median"]  # the backbones' work is left out


def test_train_step_benchmark_official_path_clips_each_parameter_on_its_own():
    """The benchmark's official path clips as official DINO (and as the lean step's default): each gradient
    ``g`` becomes ``g * min(1, 3 / (|g| + 1e-6))``, written out here from the same step's unclipped gradients."""
    from benchmarks.bench_train_step import QUICK, Timer, build, make_crops, official_parts_of, official_step

    cpu = torch.device("cpu")
    crops = make_crops(QUICK, cpu)
    clipped = official_parts_of(*build(QUICK, cpu))
    student, teacher, loss_module, _ = official_parts_of(*build(QUICK, cpu))  # the same weights (seeded)
    official_step(clipped, crops, Timer(cpu))
    with torch.no_grad():
        teacher_output = teacher(crops[:2])
    looped_dino_loss(loss_module, student(crops), teacher_output, 0).backward()
    pairs = [(p, ref) for p, ref in zip(clipped[0].parameters(), student.parameters()) if ref.grad is not None]
    norms = torch.stack([ref.grad.norm() for _, ref in pairs])
    assert norms.norm() > 3.0  # a clip of the joint norm to 3 would scale every gradient
    for (p, ref), norm in zip(pairs, norms):
        torch.testing.assert_close(p.grad, ref.grad * torch.clamp(3.0 / (norm + 1e-6), max=1.0))


def _sgd_state(student, teacher, koleo_weight):
    loss = DINOLoss(64, 4, 0.04, 0.04, 0, 5)
    optimizer = torch.optim.SGD(get_params_groups(student), lr=0.0)
    cpu = torch.device("cpu")
    return DINOState(
        student=student,
        teacher=teacher,
        student_module=student,
        loss=loss,
        optimizer=optimizer,
        scaler=None,
        device=cpu,
        clip_grad=0.0,
        freeze_last_layer=0,
        koleo_weight=koleo_weight,
    )


def test_koleo_term_is_reported_and_adds_its_gradient():
    """With a KoLeo weight w, the step reports the KoLeo term of the student's global-view features (summed over the
    2 views) and the update is the DINO update plus w times the KoLeo gradient: checked with plain SGD against
    gradients computed directly on a copy of the student."""
    from utils.train.loss import koleo_loss

    crops = batches(1, batch=6)[0]
    weight, lr = 0.5, 1e-2
    student, teacher = models()
    expected_student = models()[0]
    with torch.no_grad():
        features = expected_student.backbone(torch.cat(crops[:2]))
    expected_koleo = float(sum(koleo_loss(f) for f in features.chunk(2)))

    # the expected update: d(DINO + w * KoLeo) on a fresh copy, one SGD step of size lr
    reference_state = _sgd_state(*models(), 0.0)
    output, feats = expected_student(crops, return_features=True)
    with torch.no_grad():
        teacher_output = reference_state.teacher(crops[:2])
    global_feats = feats[: 2 * crops[0].shape[0]]  # crop-major: the two global views first
    total = reference_state.loss(output, teacher_output, 0) + weight * sum(koleo_loss(f) for f in global_feats.chunk(2))
    total.backward()

    state = _sgd_state(student, teacher, weight)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    values = train_step(state, crops, 0, StepSchedule(lr, 0.0, 1.0))
    assert abs(values.koleo_loss.item() - expected_koleo) < 1e-4
    for (name, p), ref in zip(student.named_parameters(), expected_student.parameters()):
        if ref.grad is not None:
            torch.testing.assert_close(p.detach(), (ref - lr * ref.grad).detach(), rtol=1e-4, atol=1e-6, msg=name)


def test_without_koleo_the_term_is_zero_and_the_step_unchanged():
    crops = batches(1)[0]
    plain_student, plain_teacher = models()
    state = _sgd_state(plain_student, plain_teacher, 0.0)
    values = train_step(state, crops, 0, StepSchedule(1e-2, 0.0, 0.9))
    assert values.koleo_loss.item() == 0.0


def test_cached_backbone_stand_in_runs_everything_but_the_backbone():
    """The benchmark's outside-the-backbone timing replaces both backbones by cached features: same outputs, and every
    student parameter still gets a gradient (so clipping, the optimiser and the EMA do their full work)."""
    from benchmarks.bench_train_step import without_backbones

    crops = batches(1)[0]
    student, teacher = models()
    expected_student, expected_teacher = student(crops), teacher(crops[:2])
    stand_in_student, stand_in_teacher = without_backbones(*models(), crops)
    output = stand_in_student(crops)
    torch.testing.assert_close(output, expected_student)
    with torch.no_grad():
        torch.testing.assert_close(stand_in_teacher(crops[:2]), expected_teacher)
    output.square().sum().backward()
    missing = [n for n, p in stand_in_student.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(p.grad.abs().sum() == 0 for p in stand_in_student.backbone.parameters())  # no backbone arithmetic
