"""Per-iteration schedules: learning rate, weight decay and teacher momentum."""

from __future__ import annotations

import numpy as np


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """Linear warmup then half-cosine decay, one value per training iteration.

    Returns a float64 array of length ``epochs * niter_per_ep``. The first ``warmup_epochs * niter_per_ep``
    values go linearly from ``start_warmup_value`` to ``base_value`` (both ends included); the rest follow
    ``final + (base - final) * (1 + cos(pi * i / n)) / 2`` for ``i = 0 .. n-1``, so the schedule starts at
    ``base_value`` and approaches ``final_value`` at the last iteration.
    """
    total = epochs * niter_per_ep
    warmup_iters = min(warmup_epochs * niter_per_ep, total)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.zeros(0)
    steps = np.arange(total - warmup_iters)
    n = max(len(steps), 1)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / n))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total
    return schedule


def teacher_momentum_schedule(momentum_teacher: float, epochs: int, niter_per_ep: int) -> np.ndarray:
    """EMA momentum of the teacher, one value per iteration: a half cosine from ``momentum_teacher`` at the first
    iteration to exactly 1 at the last (``1 - (1 - m) * (1 + cos(pi * i / (n - 1))) / 2``)."""
    total = epochs * niter_per_ep
    steps = np.arange(total)
    phase = steps / max(total - 1, 1)
    return 1.0 - (1.0 - momentum_teacher) * 0.5 * (1 + np.cos(np.pi * phase))


def teacher_temperature_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int, nepochs: int
) -> np.ndarray:
    """Per-epoch teacher temperature: linear warmup, then constant (DINO's schedule)."""
    warmup_epochs = min(warmup_teacher_temp_epochs, nepochs)
    return np.concatenate(
        (
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
            np.ones(max(nepochs - warmup_epochs, 0)) * teacher_temp,
        )
    )
