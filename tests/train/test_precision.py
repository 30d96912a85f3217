"""Mixed precision: what ``--precision auto`` picks, float32 logits under autocast, the fp16 + GradScaler step
against fp32, scaler back-offs counted apart from non-finite losses, resuming with another precision."""

import pytest
import torch

import main_dino
from tests.conftest import TINY_TRAIN_FLAGS
from tests.helpers import random_crops as batches
from tests.helpers import tiny_dino_models as models
from utils.model.vit import DINOHead
from utils.runtime.checkpoint import load_checkpoint
from utils.runtime.monitoring import TensorBoard
from utils.train.loss import DINOLoss
from utils.train.optim import autocast, build_grad_scaler, build_optimizer, get_params_groups, resolve_precision
from utils.train.step import DINOState, EpochPlan, StepSchedule, train_one_epoch, train_step

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "capability, expected",
    [((7, 5), "fp16"), ((7, 0), "fp16"), ((6, 0), "fp16"), ((8, 0), "bf16"), ((8, 9), "bf16"), ((9, 0), "bf16")],
)
def test_auto_precision_follows_the_compute_capability(monkeypatch, capability, expected):
    """T4 (7.5) and V100 (7.0) get fp16 + GradScaler even though PyTorch reports (emulated) bf16 support; Ampere (8.x)
    and later get bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_precision("auto", CUDA) == expected


def test_auto_precision_is_fp32_on_the_cpu_and_explicit_choices_stay():
    assert resolve_precision("auto", CPU) == "fp32"
    for choice in ("fp32", "fp16", "bf16"):
        assert resolve_precision(choice, CUDA) == choice


def test_last_layer_returns_float32_logits_under_bf16_autocast():
    """Under bf16 autocast the head's last layer computes in float32: its logits match a float64 computation from
    the same (bottleneck) input to float32 rounding, not bf16's 8-bit mantissa."""
    torch.manual_seed(0)
    head = DINOHead(32, 512, hidden_dim=64, bottleneck_dim=64)
    x = torch.nn.functional.normalize(torch.randn(16, 64), dim=-1)
    with autocast(CPU, "bf16"):
        logits = head.last_layer(x)
    assert logits.dtype == torch.float32
    v, g = head.last_layer.weight_v.double(), head.last_layer.weight_g.double()
    expected = x.double() @ (g * v / v.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-6)


def test_teacher_logits_reaching_the_loss_are_float32_under_bf16(monkeypatch):
    seen = []
    original = DINOLoss.forward_with_stats  # what the step calls

    def spy(self, student_output, teacher_output, epoch):
        seen.append((student_output.dtype, teacher_output.dtype))
        return original(self, student_output, teacher_output, epoch)

    monkeypatch.setattr(DINOLoss, "forward_with_stats", spy)
    state = make_state("bf16")
    train_step(state, batches(1)[0], 0, StepSchedule(lr=1e-3, weight_decay=0.04, momentum=0.99))
    assert seen == [(torch.float32, torch.float32)]


def make_state(precision, scaler=None, optimizer="adamw"):
    student, teacher = models()
    if scaler is None:
        scaler = build_grad_scaler(precision, CPU)
    return DINOState(
        student=student,
        teacher=teacher,
        student_module=student,
        loss=DINOLoss(64, 4, 0.04, 0.04, 0, 5),
        optimizer=build_optimizer(optimizer, get_params_groups(student)),
        scaler=scaler,
        device=CPU,
        precision=precision,
        clip_grad=3.0,
        freeze_last_layer=0,
    )


def test_fp16_with_grad_scaler_follows_fp32_over_steps():
    """Five steps of fp16 autocast + GradScaler (on the CPU) against fp32 from the same weights and batches: every
    step's loss within 1e-3 (relative) of fp32's (fp16 keeps 10 mantissa bits; bf16's 8 miss this bound here, by
    ~4e-3), and the teacher's weights within 2e-3 of fp32's."""
    fp32, fp16 = make_state("fp32"), make_state("fp16")
    assert fp16.scaler is not None
    schedule = StepSchedule(lr=1e-4, weight_decay=0.04, momentum=0.9)
    losses = {"fp32": [], "fp16": []}
    for crops in batches(5):
        for name, state in (("fp32", fp32), ("fp16", fp16)):
            losses[name].append(read_stats(train_step(state, crops, 0, schedule))["loss"])
    torch.testing.assert_close(torch.tensor(losses["fp16"]), torch.tensor(losses["fp32"]), rtol=1e-3, atol=0)
    assert losses["fp32"][0] != losses["fp32"][-1]  # the steps did train
    for (name, a), b in zip(fp32.teacher.named_parameters(), fp16.teacher.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-3, msg=name)


def read_stats(values) -> dict:
    """A step's returned numbers as a dict (the step returns a named structure of 0-d tensors)."""
    return {name: float(value) for name, value in values._asdict().items()}


def test_grad_scaler_back_offs_are_not_non_finite_losses(tmp_path):
    """A loss scale so large that every scaled gradient overflows: the scaler skips the steps and backs off. The
    losses are finite: the steps are counted as back-offs, not as non-finite losses, and do not stop the run."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    state = make_state("fp16", scaler=scaler)
    teacher_before = {n: p.clone() for n, p in state.teacher.named_parameters()}
    loader = [(crops, None, torch.zeros(1)) for crops in batches(4)]
    n = len(loader)
    schedules = {k: torch.full((n,), v, dtype=torch.float64).numpy() for k, v in (("lr", 1e-3), ("wd", 0.0))}
    schedules["momentum"] = torch.full((n,), 0.9, dtype=torch.float64).numpy()
    plan = EpochPlan(epoch=0, global_iter=0, print_freq=2, max_nonfinite=2)
    result = train_one_epoch(state, loader, plan, schedules, TensorBoard(None))
    assert state.nonfinite_steps == 0
    assert state.scaler_backoffs == n
    assert result.averages["scaler_backoffs"] == n
    assert scaler.get_scale() == 2.0 ** (127 - n)
    for name, p in state.teacher.named_parameters():  # a skipped step moves neither the student nor the teacher
        assert torch.equal(p, teacher_before[name]), name


@pytest.mark.parametrize("first, second", [("bf16", "fp32"), ("fp32", "fp16"), ("fp16", "bf16")])
def test_resume_with_another_precision(small_synthetic, tmp_path, first, second):
    out = tmp_path / "run"
    flags = [*TINY_TRAIN_FLAGS, "--data_path", str(small_synthetic), "--output_dir", str(out), "--knn_every", "0"]
    flags += ["--max_iters", "2", "--epochs", "2"]
    assert main_dino.cli([*flags, "--precision", first]) == 0
    assert main_dino.cli([*flags[:-4], "--epochs", "2", "--max_iters", "4", "--precision", second]) == 0
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    assert checkpoint["global_iter"] == 4
    assert ("scaler" in checkpoint) == (second == "fp16")


@pytest.mark.parametrize("world_size, device, synced", [(2, CUDA, True), (1, CUDA, False), (2, CPU, False)])
def test_batch_norms_in_the_head_are_synchronised_across_cuda_processes(world_size, device, synced):
    """``--use_bn_in_head`` under DDP on GPUs: student and teacher heads get SyncBatchNorm (official DINO converts
    both; the teacher's running statistics stay its own), with unchanged state-dict keys and values."""
    from types import SimpleNamespace

    from utils.train.run import synchronise_batch_norms

    ctx = SimpleNamespace(world_size=world_size, device=device)
    for model in models(use_bn_in_head=True):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model = synchronise_batch_norms(model, ctx)
        kinds = {type(m) for m in model.head.mlp}
        assert (torch.nn.SyncBatchNorm in kinds) == synced
        assert (torch.nn.BatchNorm1d in kinds) != synced
        after = model.state_dict()
        assert list(after) == list(before)
        assert all(torch.equal(after[k], v) for k, v in before.items())


def test_deterministic_help_says_what_is_bitwise():
    text = " ".join(main_dino.get_args_parser().format_help().split())
    assert "--deterministic" in text and "bit for bit" in text and "not bitwise" in text
