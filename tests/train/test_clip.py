"""Gradient clipping: ``--clip_grad`` clips each parameter's gradient separately, as official DINO's
``utils.clip_gradients`` does (written out in ``benchmarks/reference_step.py``); the global-norm clip is the explicit
``--clip_grad_mode global``."""

import pytest
import torch

import main_dino
from benchmarks.reference_step import official_clip_gradients
from utils.train.optim import clip_gradients


def parameters_with_gradients(seed=0):
    """Parameters of mixed shapes whose gradient norms lie on both sides of 1.0 (one has no gradient)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2), (11,), (2, 2)]
    scales = [0.05, 3.0, 0.9, 10.0, 0.2]
    params = []
    for shape, scale in zip(shapes, scales):
        p = torch.nn.Parameter(torch.randn(shape, generator=generator))
        p.grad = torch.randn(shape, generator=generator) * scale
        params.append(p)
    params.append(torch.nn.Parameter(torch.randn(3)))  # no gradient
    return params


def test_param_mode_clips_each_gradient_as_the_official_loop():
    ours, reference = parameters_with_gradients(), parameters_with_gradients()
    norms = official_clip_gradients(reference, 1.0)
    assert min(norms) < 1.0 < max(norms)  # some gradients are clipped, some are not
    total = clip_gradients(ours, 1.0, mode="param")
    for p, ref in zip(ours, reference):
        if ref.grad is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, ref.grad, rtol=1e-6, atol=0.0)
    # the returned norm is the global norm before clipping (what the step reports as grad_norm)
    torch.testing.assert_close(total, torch.tensor(norms).norm())


def test_param_mode_is_the_default():
    ours, reference = parameters_with_gradients(1), parameters_with_gradients(1)
    official_clip_gradients(reference, 0.5)
    clip_gradients(ours, 0.5)
    for p, ref in zip(ours, reference):
        if ref.grad is not None:
            torch.testing.assert_close(p.grad, ref.grad, rtol=1e-6, atol=0.0)


def test_global_mode_is_torchs_clip_grad_norm():
    ours, reference = parameters_with_gradients(2), parameters_with_gradients(2)
    expected = torch.nn.utils.clip_grad_norm_([p for p in reference if p.grad is not None], 1.0, foreach=False)
    total = clip_gradients(ours, 1.0, mode="global")
    torch.testing.assert_close(total, expected)
    for p, ref in zip(ours, reference):
        if ref.grad is not None:
            torch.testing.assert_close(p.grad, ref.grad)


def test_zero_clip_leaves_gradients_alone_and_returns_the_norm():
    ours, reference = parameters_with_gradients(3), parameters_with_gradients(3)
    total = clip_gradients(ours, 0.0, mode="param")
    for p, ref in zip(ours, reference):
        if ref.grad is not None:
            assert torch.equal(p.grad, ref.grad)
    expected = torch.stack([ref.grad.norm() for ref in reference if ref.grad is not None]).norm()
    torch.testing.assert_close(total, expected)


def test_param_mode_makes_no_host_synchronisation():
    params = parameters_with_gradients(4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        clip_gradients(params, 1.0, mode="param")
    names = [event.name for event in prof.events()]
    assert "aten::_local_scalar_dense" not in names and "aten::item" not in names


def test_flag_defaults_to_per_parameter_and_help_says_so():
    parser = main_dino.get_args_parser()
    args = parser.parse_args([])
    assert args.clip_grad_mode == "param"
    assert parser.parse_args(["--clip_grad_mode", "global"]).clip_grad_mode == "global"
    with pytest.raises(SystemExit):
        parser.parse_args(["--clip_grad_mode", "nonsense"])
    text = parser.format_help()
    assert "--clip_grad_mode" in text and "each parameter" in text
