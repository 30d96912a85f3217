"""What makes the training DINO, each checked against the official rule written out here (facebookresearch/dino's
``main_dino.py`` and ``utils.py``) or a closed form: the loss and its centre, the frozen last layer, the weight-decay
groups, the teacher's EMA and its lack of gradients, gradient clipping, the schedules and the lr scaling.
These are the tests that ``tools/mutation_check.py`` expects to kill its training mutants."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import main_dino
from tests.conftest import TINY_TRAIN_FLAGS
from utils.model.vit import build_dino_models
from utils.train.loss import DINOLoss
from utils.train.optim import build_optimizer, get_params_groups
from utils.train.schedules import cosine_scheduler, teacher_momentum_schedule
from utils.train.step import DINOState, StepSchedule, train_step


def official_teacher_temps(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs):
    """Official DINOLoss.__init__'s ``teacher_temp_schedule``."""
    return np.concatenate(
        (
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
        )
    )


def official_dino_loss(student_output, teacher_output, center, epoch, ncrops, temps, student_temp, center_momentum):
    """Official DINOLoss.forward and update_center, in float64; returns (loss, new centre)."""
    student_out = (student_output.double() / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output.double() - center) / temps[epoch], dim=-1).chunk(2)
    total_loss, n_loss_terms = 0.0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue  # we skip cases where student and teacher operate on the same view
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    batch_center = torch.sum(teacher_output.double(), dim=0, keepdim=True) / len(teacher_output)
    return total_loss / n_loss_terms, center * center_momentum + batch_center * (1 - center_momentum)


@pytest.mark.parametrize("student_temp, center_momentum", [(0.1, 0.9), (0.2, 0.7)])
def test_loss_and_centre_equal_the_official_dino_loss(student_temp, center_momentum):
    """Over a teacher-temperature warmup, with a teacher offset that makes the centre matter."""
    torch.manual_seed(0)
    out_dim, ncrops, batch, nepochs = 32, 4, 3, 5
    loss_fn = DINOLoss(out_dim, ncrops, 0.02, 0.07, 3, nepochs, student_temp, center_momentum)
    temps = official_teacher_temps(0.02, 0.07, 3, nepochs)
    center = torch.zeros(1, out_dim, dtype=torch.float64)
    offset = torch.randn(out_dim) * 0.5
    for epoch in range(nepochs):
        student = torch.randn(ncrops * batch, out_dim)
        teacher = torch.randn(2 * batch, out_dim) * 0.1 + offset
        expected, center = official_dino_loss(
            student, teacher, center, epoch, ncrops, temps, student_temp, center_momentum
        )
        value = loss_fn(student, teacher, epoch)
        assert abs(value.item() - expected.item()) < 1e-4 * max(1.0, abs(expected.item())), epoch
        torch.testing.assert_close(loss_fn.center.double(), center, rtol=1e-5, atol=1e-6)


def test_centre_is_an_ema_of_the_teacher_batch_mean():
    """Hand-computed: centre 0, momentum 0.9, a batch whose mean is (2, -4): centre (0.2, -0.4), then with a batch
    of mean (0, 1): 0.9 * (0.2, -0.4) + 0.1 * (0, 1) = (0.18, -0.26)."""
    loss_fn = DINOLoss(2, 2, 0.04, 0.04, 0, 1, center_momentum=0.9)
    student = torch.zeros(4, 2)
    loss_fn(student, torch.tensor([[1.0, -5.0], [3.0, -3.0]]), 0)
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.2, -0.4]]))
    loss_fn(student, torch.tensor([[1.0, 0.0], [-1.0, 2.0]]), 0)
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.18, -0.26]]))


def models(drop_path_rate=0.0, out_dim=32):
    torch.manual_seed(0)
    args = argparse.Namespace(
        arch="vit_tiny",
        patch_size=16,
        global_crop_size=32,
        drop_path_rate=drop_path_rate,
        out_dim=out_dim,
        use_bn_in_head=False,
        norm_last_layer=True,
    )
    return build_dino_models(args)


def crops(batch=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=generator) for _ in range(2)] + [
        torch.randn(batch, 3, 16, 16, generator=generator) for _ in range(2)
    ]


def dino_state(student, teacher, optimizer="adamw", clip_grad=0.0, freeze_last_layer=0, out_dim=32):
    return DINOState(
        student=student,
        teacher=teacher,
        student_module=student,
        loss=DINOLoss(out_dim, 4, 0.04, 0.04, 0, 10),
        optimizer=build_optimizer(optimizer, get_params_groups(student)),
        scaler=None,
        device=torch.device("cpu"),
        clip_grad=clip_grad,
        freeze_last_layer=freeze_last_layer,
    )


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_last_layer_is_frozen_during_the_first_epochs():
    """Official: ``cancel_gradients_last_layer`` during epochs < ``--freeze_last_layer``; the rest of the student
    trains from the first step."""
    student, teacher = models()
    state = dino_state(student, teacher, freeze_last_layer=2)
    schedule = StepSchedule(lr=1e-3, weight_decay=0.04, momentum=0.99)
    for epoch in range(3):
        before = snapshot(student)
        train_step(state, crops(seed=epoch), epoch, schedule)
        after = snapshot(student)
        frozen = epoch < 2
        assert torch.equal(before["head.last_layer.weight_v"], after["head.last_layer.weight_v"]) == frozen, epoch
        assert not torch.equal(before["head.mlp.0.weight"], after["head.mlp.0.weight"])
        assert not torch.equal(before["backbone.blocks.0.attn.qkv.weight"], after["backbone.blocks.0.attn.qkv.weight"])


def test_parameter_groups_follow_the_official_weight_decay_rule():
    """Official ``get_params_groups``: no weight decay for ``name.endswith(".bias") or len(param.shape) == 1``,
    frozen parameters left out; the weight-decay schedule sets the regularised group's decay."""
    student, _ = models()
    groups = get_params_groups(student)
    not_decayed = {id(p) for g in groups if g.get("weight_decay", None) == 0.0 for p in g["params"]}
    decayed = {id(p) for g in groups if g.get("weight_decay", None) != 0.0 for p in g["params"]}
    expected_not, expected_decayed = set(), set()
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        (expected_not if name.endswith(".bias") or len(param.shape) == 1 else expected_decayed).add(id(param))
    assert not_decayed == expected_not
    assert decayed == expected_decayed
    names = {id(p): n for n, p in student.named_parameters()}
    assert any(names[i].endswith("norm1.weight") for i in not_decayed)  # LayerNorm weights: no decay
    assert "head.last_layer.weight_g" not in {names[i] for i in not_decayed | decayed}  # frozen at 1


def test_teacher_takes_no_gradient_in_a_step():
    """Official: every teacher parameter has ``requires_grad = False``; the teacher changes by EMA only."""
    student, teacher = models()
    assert not any(p.requires_grad for p in teacher.parameters())
    state = dino_state(student, teacher)
    train_step(state, crops(), 0, StepSchedule(lr=1e-3, weight_decay=0.04, momentum=0.99))
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_teacher_is_the_official_ema_of_the_student():
    """Official EMA: ``param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)`` with the student's updated
    weights."""
    student, teacher = models()
    with torch.no_grad():  # a teacher that differs from the student, so that the EMA's weights show
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    state = dino_state(student, teacher)
    m = 0.9
    teacher_before = snapshot(teacher)
    train_step(state, crops(), 0, StepSchedule(lr=1e-3, weight_decay=0.04, momentum=m))
    student_after = snapshot(student)
    for name, value in snapshot(teacher).items():
        expected = teacher_before[name].mul(m).add((1 - m) * student_after[name])
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_clipping_bounds_every_parameter_update():
    """With SGD (first step: update = lr * gradient) and a tiny ``--clip_grad``, no parameter moves by more than
    lr * clip_grad (true of the official per-parameter clip and of a global one), and some parameter moves by about
    that much (the gradients are far larger than the clip). In float64, so that rounding stays far below the clip."""
    student, teacher = (m.double() for m in models())
    clip = 1e-6
    state = dino_state(student, teacher, optimizer="sgd", clip_grad=clip)
    before = snapshot(student)
    train_step(state, [c.double() for c in crops()], 0, StepSchedule(lr=1.0, weight_decay=0.0, momentum=0.99))
    moves = {name: (value - before[name]).norm().item() for name, value in snapshot(student).items()}
    assert max(moves.values()) <= clip * (1 + 1e-3)
    assert max(moves.values()) >= 0.5 * clip


def official_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """Official ``utils.cosine_scheduler``."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


@pytest.mark.parametrize(
    "base, final, epochs, niter, warmup, start",
    [(5e-4, 1e-6, 10, 7, 2, 0.0), (0.04, 0.4, 6, 5, 0, 0.0), (1.0, 0.25, 3, 4, 1, 0.1)],
)
def test_cosine_scheduler_equals_the_official_formula(base, final, epochs, niter, warmup, start):
    np.testing.assert_allclose(
        cosine_scheduler(base, final, epochs, niter, warmup, start),
        official_cosine_scheduler(base, final, epochs, niter, warmup, start),
        rtol=1e-12,
        atol=1e-15,
    )


def test_teacher_momentum_schedule_closed_form():
    """A half cosine from ``--momentum_teacher`` to 1: ``1 - (1 - m) (1 + cos(pi i / (n - 1))) / 2``; at a quarter of
    the way ``1 - (1 - m)(1 + cos(pi/4))/2``."""
    m, epochs, niter = 0.996, 3, 3  # n = 9 iterations
    schedule = teacher_momentum_schedule(m, epochs, niter)
    i = np.arange(9)
    np.testing.assert_allclose(schedule, 1 - (1 - m) * (1 + np.cos(np.pi * i / 8)) / 2, rtol=0, atol=1e-15)
    assert schedule[0] == pytest.approx(m, abs=1e-15) and schedule[-1] == pytest.approx(1.0, abs=1e-15)
    assert schedule[2] == pytest.approx(1 - (1 - m) * (1 + math.cos(math.pi / 4)) / 2, abs=1e-15)


def test_lr_is_scaled_by_the_global_batch(small_synthetic, tmp_path):
    """Official: the peak lr is ``--lr * batch_size_per_gpu * world_size / 256``. With no warmup and ``--min_lr``
    equal to that peak the schedule is constant, so the epoch's logged lr must be exactly ``lr * 8 / 256``."""
    out = tmp_path / "run"
    lr, batch = 3.2e-3, 8
    flags = [*TINY_TRAIN_FLAGS, "--data_path", str(small_synthetic), "--output_dir", str(out)]
    flags += ["--knn_every", "0", "--epochs", "1", "--cache_images", "off", "--batch_size_per_gpu", str(batch)]
    flags += ["--lr", str(lr), "--min_lr", str(lr * batch / 256), "--warmup_epochs", "0"]
    assert main_dino.cli(flags) == 0
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert record["train_lr"] == pytest.approx(lr * batch / 256, rel=1e-9)


@pytest.mark.parametrize("world_size", [1, 4])
def test_peak_lr_counts_every_process_in_the_global_batch(world_size):
    """Official: ``lr * batch_size_per_gpu * world_size / 256``. The schedules of a 4-process run, built without
    starting 4 processes: the pretraining object's schedule builder on a stand-in with only what it reads."""
    from types import SimpleNamespace

    from utils.train.run import DINOPretraining

    args = argparse.Namespace(
        lr=1e-3,
        min_lr=1e-6,
        epochs=2,
        warmup_epochs=0,
        batch_size_per_gpu=32,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum_teacher=0.996,
    )
    stand_in = SimpleNamespace(args=args, niter=5, ctx=SimpleNamespace(world_size=world_size))
    DINOPretraining._build_schedules(stand_in)
    assert stand_in.schedules["lr"][0] == pytest.approx(1e-3 * 32 * world_size / 256, rel=1e-12)


def test_teacher_and_student_start_equal_and_only_the_student_is_copied():
    """Official: the teacher starts with the student's weights (``load_state_dict``), not shared tensors."""
    student, teacher = models()
    for (name, s), (_, t) in zip(student.state_dict().items(), teacher.state_dict().items()):
        assert torch.equal(s, t), name
        assert s.data_ptr() != t.data_ptr(), name
