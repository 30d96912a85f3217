import pytest
import torch

from benchmarks.reference_step import official_last_layer
from utils.model.vit import WeightNormLinear
from utils.model.weight_norm import _WeightNormLinear, uses_fused_path, weight_norm_linear


def tensors(n=5, k=7, d=23, dtype=torch.float64, g_grad=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, dtype=dtype, generator=generator).requires_grad_()
    v = torch.randn(d, k, dtype=dtype, generator=generator).requires_grad_()
    g = (torch.rand(d, 1, dtype=dtype, generator=generator) + 0.5).requires_grad_(g_grad)
    return x, v, g


@pytest.mark.parametrize("rows", [1, 4, 23, 64])
def test_gradients_pass_gradcheck_over_blocks(rows):
    """Finite differences (float64) of x, V and g, with blocks of 1, 4 (a remainder of 3), all or more rows."""
    assert torch.autograd.gradcheck(lambda a, b, c: _WeightNormLinear.apply(a, b, c, rows), tensors())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fixed_norm", [True, False])
def test_equals_pytorchs_weight_norm(monkeypatch, dtype, fixed_norm):
    """Outputs and gradients equal ``nn.utils.weight_norm(nn.Linear)`` (the official head's layer), several blocks.
    float64 to 1e-12 (the formulas); float32 to float rounding (``dV`` is a projection: a difference of near terms)."""
    monkeypatch.setattr("utils.model.weight_norm.CPU_BLOCK_BYTES", 6 * 32 * torch.finfo(dtype).bits // 8)  # 6 rows
    torch.manual_seed(0)
    ours = WeightNormLinear(32, 50, fix_norm=fixed_norm).to(dtype)
    with torch.no_grad():
        ours.weight_g.uniform_(0.5, 2.0)
    official = official_last_layer(ours)
    x = torch.randn(9, 32, dtype=dtype)
    dy = torch.randn(9, 50, dtype=dtype)
    assert uses_fused_path(x, ours.weight_v)
    results = []
    for layer in (ours, official):
        xi = x.clone().requires_grad_()
        out = layer(xi)
        params = [layer.weight_v] + ([layer.weight_g] if not fixed_norm else [])
        results.append((out, *torch.autograd.grad(out, [xi, *params], dy)))
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tol)
    assert ours.weight_g.grad is None  # torch.autograd.grad leaves .grad alone


def test_only_the_needed_gradients_are_computed():
    x, v, g = tensors(g_grad=False)
    x.requires_grad_(False)
    out = weight_norm_linear(x, v, g)
    (grad_v,) = torch.autograd.grad(out, [v], torch.ones_like(out))
    composite = torch.nn.functional.linear(x, v * (g / v.norm(dim=1, keepdim=True)))
    (expected,) = torch.autograd.grad(composite, [v], torch.ones_like(out))
    torch.testing.assert_close(grad_v, expected)


def test_no_grad_forward_and_other_paths_fall_back_to_the_composition():
    x, v, g = tensors(dtype=torch.float32)
    expected = torch.nn.functional.linear(x, v * (g / v.norm(dim=1, keepdim=True)))
    with torch.no_grad():
        torch.testing.assert_close(weight_norm_linear(x, v, g), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_fused_path(x, v)
        low = weight_norm_linear(x, v, g)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), expected, rtol=0.05, atol=0.05)
    assert not uses_fused_path(x.half(), v)  # mixed dtypes: the composition (autograd) decides
