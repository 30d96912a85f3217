"""benchmarks/gpu_check.py: the device check a GPU user runs first, exercised on the CPU so that it never rots."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import timm
import torch

from benchmarks import gpu_check, gpu_check_runs, gpu_check_sections
from tests.conftest import ROOT

SECTIONS = (
    "device",
    "config",
    "tolerances",
    "matmul_peak_tflops",
    "flops",
    "precision",
    "host_syncs",
    "data_wait",
    "augmentation",
    "compile",
    "projection",
)


def errors_in(report, path: str = "") -> list[str]:
    """Every ``error`` entry anywhere in the report, with where it is."""
    if isinstance(report, dict):
        found = [f"{path}: {report['error']}"] if "error" in report else []
        return found + [e for key, value in report.items() for e in errors_in(value, f"{path}.{key}")]
    return []


def backbone_flops_closed_form(cfg: dict) -> int:
    """Matrix-product and convolution FLOPs (what ``torch.utils.flop_counter`` counts) of a DINO step's backbones:
    the teacher's forward of the 2 global views, the student's forward and backward of all views. Per image with
    ``N`` patches and ``T = N + 1`` tokens, a forward is the patch embedding ``2 N (3 P^2) D`` plus, per block, the
    qkv, projection and MLP products ``2 T D (3D + D + 2H)`` and the two attention products ``2 * 2 T^2 D``. A backward
    doubles every product (gradients of both operands) except the patch embedding's, whose input needs no gradient."""
    model = timm.create_model(cfg["arch"], img_size=cfg["global"], num_classes=0)
    dim, depth, hidden = model.embed_dim, len(model.blocks), model.blocks[0].mlp.fc1.out_features
    patch = model.patch_embed.patch_size[0]

    def parts(size: int) -> tuple[int, int]:
        patches = (size // patch) ** 2
        tokens = patches + model.num_prefix_tokens
        embed = 2 * patches * 3 * patch * patch * dim
        blocks = depth * (2 * tokens * dim * (3 * dim + dim + 2 * hidden) + 4 * tokens * tokens * dim)
        return embed, blocks

    batch = cfg["batch"]
    g_embed, g_blocks = parts(cfg["global"])
    l_embed, l_blocks = parts(cfg["local"])
    teacher = 2 * batch * (g_embed + g_blocks)
    student = 2 * batch * (2 * g_embed + 3 * g_blocks) + cfg["local_crops"] * batch * (2 * l_embed + 3 * l_blocks)
    return teacher + student


@pytest.mark.slow
def test_quick_cpu_check_reports_every_section(tmp_path):
    json_path = tmp_path / "gpu_check.json"
    command = [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--threads", "1"]
    result = subprocess.run([*command, "--json", str(json_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == json.loads(json_path.read_text())
    assert set(SECTIONS) <= set(report)
    assert errors_in(report) == []
    assert report["device"]["device"] == "cpu" and report["device"]["torch"] == torch.__version__

    precision = report["precision"]
    assert set(precision) == {"fp32", "bf16", "fp16"}
    for result_ in precision.values():
        assert len(result_["losses"]) == report["config"]["agree_steps"] == 30
        assert all(math.isfinite(loss) for loss in result_["losses"])
        assert result_["images_per_s"] > 0 and result_["mfu"] > 0
        assert result_["skipped"] == 0
    assert precision["fp32"]["scaler_backoffs"] == precision["bf16"]["scaler_backoffs"] == 0  # no GradScaler
    fp32, bf16 = precision["fp32"]["loss_last"], precision["bf16"]["loss_last"]
    assert abs(bf16 - fp32) <= report["tolerances"]["loss_rtol"] * abs(fp32)
    assert precision["bf16"]["agrees_with_fp32"] is True
    assert precision["fp32"]["losses"] != precision["bf16"]["losses"]  # bf16 really ran in bf16
    assert precision["fp32"]["loss_last"] != precision["fp32"]["loss_first"]  # the steps trained

    assert report["flops"]["backbone_per_step"] == backbone_flops_closed_form(report["config"])
    assert report["flops"]["step"] > report["flops"]["backbone_per_step"]

    for pipeline in ("cache_batched", "per_image_workers"):
        wait = report["data_wait"][pipeline]
        assert wait["images_per_s"] > 0 and wait["images_per_s_fixed_batch"] > 0
        assert 0.0 <= wait["wait_fraction"] <= 1.0
    for part in ("step", "iteration"):
        syncs = report["host_syncs"][part]
        assert syncs["cuda_syncs"] == "n/a" and syncs["scalar_reads"] >= 0 and syncs["unpinned_h2d_copies"] == 0

    augmentation = report["augmentation"]["tf32_default"]
    assert augmentation["max_abs_diff"] <= report["tolerances"]["aug_atol_fp32"] and augmentation["agrees"] is True
    assert augmentation["mean_abs_diff"] <= augmentation["needed_atol"] <= augmentation["max_abs_diff"]
    assert "skipped" in report["compile"]

    projection = report["projection"]
    img_s = report["data_wait"]["cache_batched"]["images_per_s"]
    assert projection["images_per_s"] == img_s
    assert projection["seconds"] == pytest.approx(300 * 100000 / img_s)
    assert projection["hours"] == pytest.approx(projection["seconds"] / 3600)
    assert "precision" in result.stdout and "projection" in result.stdout


def test_sync_spy_counts_scalar_reads_and_unpinned_copies():
    spy = gpu_check_sections.SyncSpy()
    x = torch.arange(4.0)
    with spy:
        x.sum().item()
        bool(x[1] > 0)
        float(x[2])
        x.tolist()  # no aten call: not a scalar read as the dispatcher sees it
        x.to("meta")
        x.clone().to(torch.float64)  # stays on the CPU
        torch.empty(4, device="meta").copy_(x)
    assert spy.scalar_reads == 3
    assert spy.unpinned_copies == 2


@pytest.mark.slow
def test_a_failing_section_is_reported_and_the_rest_runs(monkeypatch, capsys):
    def broken(check):
        raise RuntimeError("no matmul today")

    monkeypatch.setattr(gpu_check, "matmul_peak", broken)
    skip = ["flops", "precision", "host_syncs", "data_wait", "compile"]
    report = gpu_check.main(["--device", "cpu", "--quick", "--threads", "1", "--skip", *skip])
    assert report["matmul_peak_tflops"]["error"].startswith("RuntimeError: no matmul today")
    assert report["augmentation"]["tf32_default"]["agrees"] is True
    assert all(report[key] == {"skipped": "--skip"} for key in ("flops", "precision", "data_wait"))
    assert "error" in report["projection"]  # nothing measured images/s: its own error, not a crash
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report


@pytest.mark.slow
def test_compile_section_runs_with_a_stand_in_compiler(monkeypatch, tmp_path):
    """The compile section's code path on the CPU, with ``torch.compile``'s eager backend standing in for inductor
    (whose C++ compilation takes minutes on a CPU)."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="eager"))
    data = gpu_check.generate_synthetic_dataset(tmp_path / "data", train_per_class=1, val_per_class=0)
    check = gpu_check_runs.Check(dict(gpu_check.QUICK), "cpu", data, tmp_path)
    result = gpu_check_sections.compile_check(check)
    assert result["plain_step_s"] > 0 and result["compiled_step_s"] > 0
    assert result["speedup"] == pytest.approx(result["plain_step_s"] / result["compiled_step_s"])


def test_asking_for_cuda_without_it_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--device", "cuda", "--quick"])
    assert exit_.value.code == 2


def test_tf32_context_sets_both_flags_and_restores_them():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    for mode, expected in (("on", (True, True)), ("off", (False, False)), ("default", saved)):
        with gpu_check_sections.tf32(mode):
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == expected
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == saved
