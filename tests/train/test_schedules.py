import math

import numpy as np
import pytest

from utils import cosine_scheduler
from utils.train.schedules import teacher_momentum_schedule, teacher_temperature_schedule


def closed_form(base, final, epochs, niter, warmup_epochs, start):
    """The schedule written element by element from its definition."""
    total, warm = epochs * niter, warmup_epochs * niter
    values = []
    for it in range(total):
        if it < warm:
            values.append(start + (base - start) * it / (warm - 1) if warm > 1 else start)  # numpy.linspace's ends
        else:
            i, n = it - warm, total - warm
            values.append(final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)))
    return np.array(values)


@pytest.mark.parametrize(
    "base, final, epochs, niter, warmup, start",
    [(5e-4, 1e-6, 10, 7, 2, 0.0), (0.04, 0.4, 5, 3, 0, 0.0), (1.0, 0.0, 3, 1, 1, 0.5), (0.1, 0.1, 4, 5, 0, 0.0)],
)
def test_cosine_scheduler_matches_closed_form(base, final, epochs, niter, warmup, start):
    schedule = cosine_scheduler(base, final, epochs, niter, warmup_epochs=warmup, start_warmup_value=start)
    assert schedule.shape == (epochs * niter,)
    np.testing.assert_allclose(schedule, closed_form(base, final, epochs, niter, warmup, start), rtol=1e-12)
    if warmup:
        assert schedule[0] == pytest.approx(start)
    if warmup * niter > 1:
        assert schedule[warmup * niter - 1] == pytest.approx(base)
    assert schedule[warmup * niter] == pytest.approx(base)


def test_cosine_is_monotone_after_warmup():
    schedule = cosine_scheduler(1.0, 0.1, 20, 10, warmup_epochs=3)
    assert np.all(np.diff(schedule[:30]) > 0)
    assert np.all(np.diff(schedule[30:]) < 0)
    assert schedule[-1] > 0.1 and schedule[-1] == pytest.approx(0.1, abs=1e-4)


def test_teacher_momentum_goes_from_base_to_exactly_one():
    schedule = teacher_momentum_schedule(0.996, 10, 13)
    assert schedule[0] == pytest.approx(0.996)
    assert schedule[-1] == 1.0
    assert np.all(np.diff(schedule) >= 0)
    i, n = 37, 10 * 13 - 1
    assert schedule[i] == pytest.approx(1 - 0.004 * 0.5 * (1 + math.cos(math.pi * i / n)))


def test_teacher_temperature_warmup_then_constant():
    schedule = teacher_temperature_schedule(0.04, 0.07, 30, 100)
    assert len(schedule) == 100
    np.testing.assert_allclose(schedule[:30], np.linspace(0.04, 0.07, 30))
    assert np.all(schedule[30:] == 0.07)
