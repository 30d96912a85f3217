"""Compiled CPU kernels (Numba) for the batched multi-crop augmentation (``utils/data/augment/batched.py``).

:func:`finish_views` finishes a view sample by sample in one compiled loop, each sample with its own parameters and
its own jitter order: the resize's height pass (only the nonzero weights of each output row; the width pass stays a
batched matrix product, :func:`utils.data.augment.batched.resize_width`), colour jitter, grayscale, Gaussian blur,
solarisation and normalisation. Same formulas in float32 as the tensor path (``utils/data/augment/color.py`` and
``batched.py``); both are compared with torchvision's functional ops in ``tests/data/test_augment_kernels.py``.

Numba is optional: :data:`AVAILABLE` is false without it and the tensor path is used. The kernels are compiled on
first use and cached on disk (``__pycache__``); they release the GIL (``nogil``), so that a prefetching thread can
run them alongside the training step.
"""

from __future__ import annotations

import math

import numpy as np

try:  # optional: the tensor path needs nothing of this
    import numba
except ImportError:  # pragma: no cover - exercised where numba is not installed
    numba = None

__all__ = ["AVAILABLE", "finish_views"]

#: Whether the compiled kernels can be used (Numba importable).
AVAILABLE = numba is not None

# torchvision's grey level (utils.data.augment.color.GRAY_WEIGHTS), as float32 like the tensor path's scalars
_GR, _GG, _GB = np.float32(0.2989), np.float32(0.587), np.float32(0.114)


def _jit(function):
    if numba is None:  # pragma: no cover
        return function
    return numba.njit(cache=True, nogil=True, error_model="numpy")(function)


@_jit
def _blend(img, factor, target_kind, mean_grey):
    """In place on ``img`` ``[3, H, W]``: ``clamp(f x + (1 - f) t, 0, 1)``, ``t`` 0 (``target_kind`` 0), the mean
    grey level (1) or the pixel's grey level (2)."""
    f = np.float32(factor)
    keep = np.float32(1.0) - f
    offset = keep * np.float32(mean_grey) if target_kind == 1 else np.float32(0.0)
    height, width = img.shape[1], img.shape[2]
    for i in range(height):
        r, g, b = img[0, i], img[1, i], img[2, i]
        for j in range(width):
            t = offset
            if target_kind == 2:
                t = keep * (_GR * r[j] + _GG * g[j] + _GB * b[j])
            r[j] = min(max(f * r[j] + t, np.float32(0.0)), np.float32(1.0))
            g[j] = min(max(f * g[j] + t, np.float32(0.0)), np.float32(1.0))
            b[j] = min(max(f * b[j] + t, np.float32(0.0)), np.float32(1.0))


@_jit
def _mean_grey(img):
    """Mean grey level of ``img`` ``[3, H, W]`` (row sums in float32, their total in float64)."""
    total = 0.0
    height, width = img.shape[1], img.shape[2]
    for i in range(height):
        row = np.float32(0.0)
        for j in range(width):
            row += _GR * img[0, i, j] + _GG * img[1, i, j] + _GB * img[2, i, j]
        total += row
    return total / (height * width)


@_jit
def _shift_hue(img, shift):
    """Rotate the hue of ``img`` ``[3, H, W]`` by ``shift`` turns, in place (torchvision's ``adjust_hue``; the
    formulas of :func:`utils.data.augment.color.shift_hue`)."""
    six_shift = np.float32(6.0 * shift)
    tiny = np.float32(1.1754944e-38)
    height, width = img.shape[1], img.shape[2]
    for i in range(height):
        r, g, b = img[0, i], img[1, i], img[2, i]
        for j in range(width):
            red, green, blue = r[j], g[j], b[j]
            maxc = max(max(red, green), blue)
            minc = min(min(red, green), blue)
            chroma = maxc - minc
            # hue in sixths of a turn; ties between maximal channels resolved red, then green (torchvision)
            if maxc == red:
                h = green - blue
            elif maxc == green:
                h = np.float32(2.0) * chroma + blue - red
            else:
                h = np.float32(4.0) * chroma + red - green
            h = h / max(chroma, tiny) + six_shift
            h = h - np.float32(6.0) * math.floor(h * np.float32(1.0 / 6.0))
            pr = min(max(abs(h - np.float32(3.0)) - np.float32(1.0), np.float32(0.0)), np.float32(1.0))
            pg = min(max(np.float32(2.0) - abs(h - np.float32(2.0)), np.float32(0.0)), np.float32(1.0))
            pb = min(max(np.float32(2.0) - abs(h - np.float32(4.0)), np.float32(0.0)), np.float32(1.0))
            r[j] = minc + pr * chroma
            g[j] = minc + pg * chroma
            b[j] = minc + pb * chroma


@_jit
def _grayscale(img):
    """Replace ``img`` ``[3, H, W]`` by its grey level on the 3 channels, in place."""
    height, width = img.shape[1], img.shape[2]
    for i in range(height):
        for j in range(width):
            grey = _GR * img[0, i, j] + _GG * img[1, i, j] + _GB * img[2, i, j]
            img[0, i, j] = grey
            img[1, i, j] = grey
            img[2, i, j] = grey


@_jit
def _reflect(index, n):
    """Reflect padding's source index (``-1 -> 1``, ``n -> n - 2``) for ``-n < index < 2n - 1``."""
    if index < 0:
        return -index
    if index >= n:
        return 2 * (n - 1) - index
    return index


@_jit
def _gaussian_blur(img, sigma, scratch_row, scratch_plane):
    """Blur ``img`` ``[3, H, W]`` in place with the Gaussian of standard deviation ``sigma`` truncated at radius
    ``min(ceil(3 sigma), min(H, W) - 1)`` (normalised taps computed in float64, used in float32), reflect padding;
    separable: along the width into ``scratch_plane``, then along the height back into ``img``, each output row
    accumulated tap by tap (contiguous, vectorised loops). ``scratch_row`` float32 of at least ``W + 2 * radius``
    entries, ``scratch_plane`` float32 ``[H, W]``."""
    height, width = img.shape[1], img.shape[2]
    radius = min(int(math.ceil(3.0 * sigma)), min(height, width) - 1)
    taps64 = np.empty(2 * radius + 1)
    for t in range(2 * radius + 1):
        d = (t - radius) / sigma
        taps64[t] = math.exp(-0.5 * d * d)
    taps = (taps64 / taps64.sum()).astype(np.float32)
    for c in range(3):
        plane = img[c]
        for i in range(height):  # along the width: the row, reflect-padded, then the taps
            row = plane[i]
            for j in range(radius):
                scratch_row[j] = row[radius - j]
                scratch_row[width + radius + j] = row[width - 2 - j]
            scratch_row[radius : radius + width] = row
            out = scratch_plane[i]
            for j in range(width):
                out[j] = taps[0] * scratch_row[j]
            for t in range(1, 2 * radius + 1):
                w, shifted = taps[t], scratch_row[t : t + width]
                for j in range(width):
                    out[j] += w * shifted[j]
        for i in range(height):  # along the height: rows of the intermediate plane, reflected at the edges
            out = plane[i]
            source = scratch_plane[_reflect(i - radius, height)]
            for j in range(width):
                out[j] = taps[0] * source[j]
            for t in range(1, 2 * radius + 1):
                w, source = taps[t], scratch_plane[_reflect(i - radius + t, height)]
                for j in range(width):
                    out[j] += w * source[j]


@_jit
def _resize_height(mid, rows, clip, img):
    """The height pass of the crop + resize, for one sample: ``img[c, s] = sum_h rows[s, h] * mid[h, c]`` over the
    nonzero weights of ``rows[s]`` only (4 source rows for a bicubic enlargement, instead of all ``H``), clipped to
    [0, 1] where ``clip``. ``mid`` float32 ``[H, 3, W]``, ``rows`` float32 ``[S, H]``, ``img`` float32
    ``[3, S, W]``."""
    size, height = rows.shape
    width = mid.shape[2]
    for s in range(size):
        weights = rows[s]
        first, stop = 0, height
        while first < height and weights[first] == 0:
            first += 1
        while stop > first and weights[stop - 1] == 0:
            stop -= 1
        for c in range(3):
            out = img[c, s]
            for j in range(width):
                out[j] = np.float32(0.0)
            for h in range(first, stop):
                w, source = weights[h], mid[h, c]
                for j in range(width):
                    out[j] += w * source[j]
            if clip:
                for j in range(width):
                    out[j] = min(max(out[j], np.float32(0.0)), np.float32(1.0))


@_jit
def _finish_views(mid, rows, clip, out, jitter, factors, order, grayscale, blur, sigma, solarize, threshold, mean, std):
    height, width = rows.shape[1], mid.shape[3]
    img = np.empty((3, height, width), dtype=np.float32)
    scratch_row = np.empty(3 * width, dtype=np.float32)
    scratch_plane = np.empty((height, width), dtype=np.float32)
    for n in range(mid.shape[0]):
        _resize_height(mid[n], rows[n], clip, img)
        if jitter[n]:
            for k in range(4):
                op = order[n, k]
                if op == 3:
                    _shift_hue(img, factors[n, 3])
                elif op == 1:
                    _blend(img, factors[n, 1], 1, _mean_grey(img))
                else:
                    _blend(img, factors[n, op], 0 if op == 0 else 2, 0.0)
        if grayscale[n]:
            _grayscale(img)
        if blur[n]:
            _gaussian_blur(img, sigma[n], scratch_row, scratch_plane)
        for c in range(3):
            scale = np.float32(1.0 / std[c])
            shift = np.float32(-mean[c] / std[c])
            source, target = img[c], out[n, c]
            for i in range(height):
                s, t = source[i], target[i]
                if solarize[n]:
                    for j in range(width):
                        v = s[j]
                        if v >= threshold:
                            v = np.float32(1.0) - v
                        t[j] = v * scale + shift
                else:
                    for j in range(width):
                        t[j] = s[j] * scale + shift


def finish_views(
    mid: np.ndarray,
    rows: np.ndarray,
    out: np.ndarray,
    params: dict[str, np.ndarray],
    *,
    clip: bool,
    threshold: float,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> None:
    """Everything after the width pass of one view's crop + resize, per sample: the height pass (``mid`` float32
    ``[B, H, 3, W]`` and ``rows`` float32 ``[B, S, H]`` of :func:`utils.data.augment.batched.resize_width`; clipped to
    [0, 1] where ``clip``), colour jitter (``params["jitter"]``, factors and order), grayscale, Gaussian blur
    (``params["sigma"]``), solarisation at ``threshold`` and normalisation by ``mean`` / ``std``, written into
    ``out`` float32 ``[B, 3, S, W]``. All C-contiguous NumPy arrays; ``params`` the host arrays of
    :func:`utils.data.augment.params.sample_params`."""
    batch, height, width = mid.shape[0], rows.shape[1], mid.shape[3]
    if mid.shape[1:3] != (rows.shape[2], 3) or rows.shape[0] != batch or out.shape != (batch, 3, height, width):
        raise ValueError(f"shapes do not match: mid {mid.shape}, rows {rows.shape}, out {out.shape}")
    _finish_views(
        mid,
        rows,
        bool(clip),
        out,
        params["jitter"],
        params["jitter_factors"].astype(np.float64),
        params["jitter_order"],
        params["grayscale"],
        params["blur"],
        params["sigma"].astype(np.float64),
        params["solarize"],
        np.float32(threshold),
        np.asarray(mean, dtype=np.float64),
        np.asarray(std, dtype=np.float64),
    )
