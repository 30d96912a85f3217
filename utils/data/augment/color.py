"""Colour operations of the batched multi-crop augmentation (``utils/data/augment/batched.py``): torchvision's
``ColorJitter`` with per-sample factors and order (:func:`color_jitter`, its hue rotation :func:`shift_hue`) and
random grayscale (:func:`grayscale`), on float ``[B, 3, H, W]`` batches in [0, 1], in place."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from utils.data.augment.transfer import DevicePack, HostPack, Slot, to_device
from utils.data.augment.workspace import Workspace, contiguous_runs, sample_indices, scratch

__all__ = [
    "GRAY_WEIGHTS",
    "JitterRun",
    "color_jitter",
    "grayscale",
    "plan_color_jitter",
    "run_color_jitter",
    "shift_hue",
]

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


@lru_cache(maxsize=8)
def _gray_weights(dtype: torch.dtype, device: torch.device) -> Tensor:
    return to_device(torch.tensor(GRAY_WEIGHTS, dtype=dtype), device)


def _gray(x: Tensor, out: Tensor | None = None) -> Tensor:
    """Grey level ``[B, H, W]`` of RGB ``[B, 3, H, W]`` (torchvision's tensor weights)."""
    r, g, b = x.unbind(dim=1)
    return torch.mul(r, GRAY_WEIGHTS[0], out=out).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2])


def shift_hue(x: Tensor, shift: Tensor, out: Tensor | None = None, ws: Workspace | None = None) -> Tensor:
    """Rotate the hue of RGB ``[B, 3, H, W]`` in [0, 1] by ``shift[b]`` turns, keeping saturation and value:
    torchvision's tensor ``adjust_hue`` (RGB → HSV, ``h = (h + shift) mod 1``, HSV → RGB; ties between maximal
    channels resolved red, then green, as there). ``out`` may be ``x`` (in place).

    Written with arithmetic only (no ``torch.where``, comparisons or reductions over the channel axis: slow on
    CPUs) and channel by channel with scalar operands. Hue in sixths of a turn ``h``: ``(g - b) / C`` where
    red is the maximum, ``2 + (b - r) / C`` where green is, ``4 + (r - g) / C`` where blue is (``C = max - min``,
    the chroma; 0 for greys). Back to RGB: each channel is ``min + C * pure(h)``, with the fully saturated colour of
    hue ``h`` ``pure = (|h - 3| - 1, 2 - |h - 2|, 2 - |h - 4|)`` clamped to [0, 1] (the six-sector HSV formula
    written without sectors).
    """
    batch, _, height, width = x.shape
    r, g, b = x.unbind(dim=1)
    plane = (batch, height, width)
    maxc = torch.maximum(r, g, out=scratch(ws, "hue_max", plane, x))
    maxc = torch.maximum(maxc, b, out=maxc)
    minc = torch.minimum(r, g, out=scratch(ws, "hue_min", plane, x))
    minc = torch.minimum(minc, b, out=minc)
    chroma = torch.sub(maxc, minc, out=scratch(ws, "hue_chroma", plane, x))
    not_r = torch.sub(maxc, r, out=scratch(ws, "hue_a", plane, x)).sign_()  # 1 where red is not the maximum
    only_b = torch.sub(maxc, g, out=scratch(ws, "hue_b", plane, x)).sign_().mul_(not_r)  # neither red nor green
    # h * C = (g - b) + not_r * [(2C + b - r) - (g - b)] + only_b * [(4C + r - g) - (2C + b - r)]
    #       = (g - b) - not_r * [(s - 2C) - 3b] - only_b * [(s - 2C) - 3r],  s = r + g + b
    excess = torch.add(r, g, out=scratch(ws, "hue_c", plane, x)).add_(b).sub_(chroma, alpha=2)  # s - 2C
    hue = torch.sub(g, b, out=scratch(ws, "hue", plane, x))
    term = torch.add(excess, b, alpha=-3, out=scratch(ws, "hue_d", plane, x))
    hue.addcmul_(not_r, term, value=-1)
    hue.addcmul_(only_b, torch.add(excess, r, alpha=-3, out=term), value=-1)
    hue.div_(torch.clamp(chroma, min=torch.finfo(x.dtype).tiny, out=not_r))
    shift = shift if shift.device == x.device else to_device(shift, x.device)
    hue.add_(shift.to(x.dtype).mul(6).view(batch, 1, 1))
    hue.sub_(torch.mul(hue, 1 / 6, out=only_b).floor_(), alpha=6)  # mod 6 (cheaper than torch.remainder on CPUs)
    out = torch.empty_like(x) if out is None else out
    for channel, (offset, slope, intercept) in enumerate(((3.0, 1.0, -1.0), (2.0, -1.0, 2.0), (4.0, -1.0, 2.0))):
        pure = torch.sub(hue, offset, out=term).abs_()
        pure = torch.add(torch.tensor(intercept, dtype=x.dtype), pure, alpha=slope, out=pure).clamp_(0, 1)
        torch.addcmul(minc, pure, chroma, out=out[:, channel])
    return out


def _blend(x: Tensor, factor: Tensor, contrast: Tensor | None, saturation: Tensor | None, ws: Workspace | None) -> None:
    """Brightness, contrast or saturation of each sample of ``x`` ``[n, 3, H, W]`` (in place; per-sample operands
    ``[n]`` on ``x``'s device): ``clamp(f x + (1 - f) target, 0, 1)``, target 0, the mean grey level or the grey
    image, computed as ``clamp(f x + t)`` with ``t = a * grey + c * mean_grey`` per sample (``a = 1 - f`` where the
    operation is saturation, ``c = 1 - f`` where it is contrast, else 0; ``contrast`` / ``saturation`` None when no
    sample of the run needs them): a product and a sum broadcast over the channels, plus the grey image where some
    sample needs it."""
    offset = target = None
    if contrast is not None:
        mean_grey = x.flatten(2).mean(dim=2) @ _gray_weights(x.dtype, x.device)  # [n]
        offset = contrast.mul(mean_grey).view(-1, 1, 1, 1)
    if saturation is not None:
        grey = _gray(x, out=scratch(ws, "jitter_grey", (x.shape[0], *x.shape[2:]), x))
        target = grey.mul_(saturation.view(-1, 1, 1)).unsqueeze(1)
        if offset is not None:
            target.add_(offset)
    x.mul_(factor.view(-1, 1, 1, 1))
    if target is not None or offset is not None:
        x.add_(target if target is not None else offset)
    x.clamp_(0, 1)


@dataclass(frozen=True)
class JitterRun:
    """One step of a colour-jitter plan: samples ``[start, stop)`` get a blend (``hue`` false; slots of ``factor``
    and, where needed, of the contrast and saturation coefficients) or a hue shift (``hue`` true; ``factor`` holds
    the shift in turns)."""

    start: int
    stop: int
    hue: bool
    factor: Slot
    contrast: Slot | None = None
    saturation: Slot | None = None


def plan_color_jitter(
    pack: HostPack, apply: np.ndarray, factors: np.ndarray, order: np.ndarray, dtype: torch.dtype
) -> list[JitterRun]:
    """The steps of :func:`color_jitter` for host parameters (``apply`` bool ``[B]``, ``factors`` ``[B, 4]``,
    ``order`` int ``[B, 4]``), in execution order, their per-sample operands (``dtype``) queued in ``pack``."""
    factors = factors.astype(np.float64)
    rows = np.arange(len(order))
    steps = []
    for k in range(4):
        op = order[:, k]
        f = factors[rows, op]
        for start, stop in contiguous_runs(apply & (op != 3)):
            run_op, keep = op[start:stop], 1 - f[start:stop]
            contrast, saturation = run_op == 1, run_op == 2
            steps.append(
                JitterRun(
                    start,
                    stop,
                    False,
                    pack.add(f[start:stop].astype(np.float32), dtype),
                    pack.add((keep * contrast).astype(np.float32), dtype) if contrast.any() else None,
                    pack.add((keep * saturation).astype(np.float32), dtype) if saturation.any() else None,
                )
            )
        for start, stop in contiguous_runs(apply & (op == 3)):
            steps.append(JitterRun(start, stop, True, pack.add(f[start:stop], dtype)))
    return steps


def run_color_jitter(x: Tensor, steps: list[JitterRun], operands: DevicePack, ws: Workspace | None = None) -> Tensor:
    """Apply a plan of :func:`plan_color_jitter` to ``x`` (in place) with its operands on ``x``'s device."""
    for step in steps:
        part = x[step.start : step.stop]
        if step.hue:
            shift_hue(part, operands[step.factor], out=part, ws=ws)
        else:
            contrast = None if step.contrast is None else operands[step.contrast]
            saturation = None if step.saturation is None else operands[step.saturation]
            _blend(part, operands[step.factor], contrast, saturation, ws)
    return x


def color_jitter(x: Tensor, apply: Tensor, factors: Tensor, order: Tensor, ws: Workspace | None = None) -> Tensor:
    """Torchvision's ``ColorJitter`` with per-sample factors and order, where ``apply[b]``; ``x`` float
    ``[B, 3, H, W]`` in [0, 1], changed in place and returned.

    Pass ``k`` applies, to every jittered sample, the operation ``order[b, k]`` (0 brightness, 1 contrast,
    2 saturation, 3 hue): the blends ``clamp(f x + (1 - f) target)`` (target 0, the image's mean grey level, its
    grey image; :func:`_blend`) on the samples whose turn is a blend, :func:`shift_hue` on those whose turn is hue,
    each on contiguous runs of samples (slices). Correct in any sample order; fastest when the samples are sorted
    by :func:`utils.data.augment.batched.processing_order`, where every pass is one hue run and at most two blend
    runs. The parameters are read on the host, the plan made there and its operands sent to ``x``'s device in one
    copy.
    """
    pack = HostPack()
    steps = plan_color_jitter(pack, apply.cpu().numpy(), factors.cpu().numpy(), order.cpu().numpy(), x.dtype)
    return run_color_jitter(x, steps, pack.send(x.device), ws)


def _grayscale_at(x: Tensor, index: Tensor, ws: Workspace | None = None) -> Tensor:
    """Replace the images ``index`` (int64 on ``x``'s device) by their grey level on the 3 channels (in place)."""
    part = torch.index_select(x, 0, index, out=scratch(ws, "gray_in", (len(index), *x.shape[1:]), x))
    gray = _gray(part, out=scratch(ws, "gray", (len(index), *x.shape[2:]), x))
    return x.index_copy_(0, index, gray.unsqueeze(1).expand_as(part))


def grayscale(x: Tensor, apply: Tensor, ws: Workspace | None = None) -> Tensor:
    """Replace the images where ``apply[b]`` by their grey level on the 3 channels (in place)."""
    mask = apply.cpu().numpy()
    return _grayscale_at(x, sample_indices(mask, x.device), ws) if mask.any() else x
