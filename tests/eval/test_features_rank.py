"""The dimensional-collapse indicator ``utils.eval.features.effective_rank`` against its closed form."""

import math

import pytest
import torch

from utils.eval.features import effective_rank


def _with_spectrum(singular_values, n=64, seed=0):
    """A centred ``[n, D]`` matrix whose singular values are exactly ``singular_values`` (random orthonormal bases)."""
    g = torch.Generator().manual_seed(seed)
    d = len(singular_values)
    u = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))[0]
    u = torch.linalg.qr(u - u.mean(dim=0, keepdim=True))[0]  # orthonormal columns, each of zero mean
    v = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    return u @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("k", [1, 3, 10])
def test_k_equal_directions_give_rank_k(k):
    features = _with_spectrum([2.0] * k + [0.0] * (16 - k))
    assert effective_rank(features) == pytest.approx(k, rel=1e-6)


def test_uneven_spectrum_matches_the_entropy_formula():
    s = [3.0, 2.0, 1.0, 0.5]
    p = torch.tensor(s, dtype=torch.float64) ** 2
    p = p / p.sum()
    expected = math.exp(float(-(p * p.log()).sum()))
    assert effective_rank(_with_spectrum(s).float()) == pytest.approx(expected, rel=1e-4)
    assert 1 < expected < 4


def test_a_shared_offset_does_not_count_and_degenerate_inputs_give_zero():
    features = _with_spectrum([1.0, 1.0, 0.0])
    assert effective_rank(features + 100.0) == pytest.approx(2.0, rel=1e-6)  # the mean is removed first
    assert effective_rank(torch.ones(10, 4)) == 0.0
    assert effective_rank(torch.randn(1, 4)) == 0.0


def test_chunked_accumulation_equals_one_pass():
    features = torch.randn(300, 12, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 3, 12) + 5.0
    assert effective_rank(features, chunk_rows=7) == pytest.approx(effective_rank(features), rel=1e-9)
