"""Per-sample Gaussian blur of a batch of images, as torchvision's ``gaussian_blur`` applied to each sample alone
(``2 ceil(3 sigma) + 1`` taps, reflect padding): kernels planned on the host, separable grouped convolutions on the
images' device."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from utils.data.augment.transfer import DevicePack, HostPack, Slot
from utils.data.augment.workspace import contiguous_runs

__all__ = ["BlurRun", "blur", "blur_kernel_size", "blur_radius", "gaussian_blur", "plan_blur", "run_gaussian_blur"]

#: Padded input of one blur convolution on a CPU (samples at a time): about the L2 cache size.
CONV_CHUNK_BYTES = 1 << 20


def blur_kernel_size(sigma: Tensor | float) -> Tensor | int:
    """Taps of the Gaussian kernel of standard deviation ``sigma``: ``2 * ceil(3 * sigma) + 1`` (±3 sigma)."""
    if isinstance(sigma, Tensor):
        return 2 * torch.ceil(3 * sigma).long() + 1
    return 2 * math.ceil(3 * sigma) + 1


def blur_radius(sigma: Tensor, max_radius: int) -> Tensor:
    """Kernel radius ``(blur_kernel_size(sigma) - 1) / 2 = ceil(3 sigma)``, at most ``max_radius``."""
    return torch.clamp((blur_kernel_size(sigma) - 1) // 2, max=max_radius)


@dataclass(frozen=True)
class BlurRun:
    """One convolution of a blur plan: samples ``[start, stop)`` with kernels of radius ``radius`` (slot of the
    ``[(stop - start) * C, 2 * radius + 1]`` taps, one kernel per sample and channel)."""

    start: int
    stop: int
    radius: int
    kernel: Slot


def plan_gaussian_blur(
    pack: HostPack,
    sigma: np.ndarray,
    height: int,
    width: int,
    channels: int,
    dtype: torch.dtype,
    max_samples: int | None = None,
    offset: int = 0,
) -> list[BlurRun]:
    """The convolutions of :func:`gaussian_blur` for host standard deviations ``sigma`` ``[n]`` of samples
    ``offset ..``: runs of at most ``max_samples`` samples, their kernels (``dtype``) queued in ``pack``."""
    sigma = torch.from_numpy(np.asarray(sigma)).to(torch.float64)
    radius = blur_radius(sigma, min(height, width) - 1).numpy()
    step = max_samples or max(len(sigma), 1)
    runs = []
    for start in range(0, len(sigma), step):
        part = slice(start, start + step)
        r = int(radius[part].max())
        taps = torch.arange(-r, r + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (taps[None, :] / sigma[part, None]) ** 2)
        kernel = kernel * (taps.abs() <= torch.from_numpy(radius[part])[:, None])
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(dtype)
        kernel = kernel.repeat_interleave(channels, dim=0)  # one kernel per (sample, channel) group
        runs.append(BlurRun(offset + start, offset + min(start + step, len(sigma)), r, pack.add(kernel)))
    return runs


def run_gaussian_blur(x: Tensor, runs: list[BlurRun], operands: DevicePack, out: Tensor | None = None) -> Tensor:
    """Apply the convolutions of :func:`plan_gaussian_blur` to ``x`` ``[B, C, H, W]`` (into ``out``, which may be
    ``x``; samples outside the runs are not written)."""
    batch, channels, height, width = x.shape
    out = torch.empty_like(x) if out is None else out
    for run in runs:
        part, r = slice(run.start, run.stop), run.radius
        groups = (run.stop - run.start) * channels
        kernel = operands[run.kernel]
        padded = F.pad(x[part], (r, r, r, r), mode="reflect").view(1, groups, height + 2 * r, width + 2 * r)
        blurred = F.conv2d(padded, kernel.view(groups, 1, 1, -1), groups=groups)
        blurred = F.conv2d(blurred, kernel.view(groups, 1, -1, 1), groups=groups)
        out[part] = blurred.view(run.stop - run.start, channels, height, width)
    return out


def gaussian_blur(x: Tensor, sigma: Tensor, out: Tensor | None = None, max_samples: int | None = None) -> Tensor:
    """Per-sample Gaussian blur of ``x`` float ``[B, C, H, W]``: sample ``b`` convolved with the normalised
    Gaussian of standard deviation ``sigma[b]`` truncated to :func:`blur_kernel_size` taps (radius at most
    ``min(H, W) - 1``), reflect padding — torchvision's ``gaussian_blur(x[b], kernel_size, sigma[b])``.

    Separable: one reflect pad and one grouped convolution (a group per sample and channel) along each axis, per
    run of at most ``max_samples`` consecutive samples (all at once by default), with the largest kernel radius of
    the run (zero taps beyond each sample's own radius): sort the samples by radius for the fewest zero taps, as
    :func:`blur` does. ``out`` may be ``x`` (each run is padded, i.e. copied, before its result is written). The
    kernels are made on the host from ``sigma`` and sent to ``x``'s device in one copy.
    """
    batch, channels, height, width = x.shape
    pack = HostPack()
    runs = plan_gaussian_blur(pack, sigma.detach().cpu().numpy(), height, width, channels, x.dtype, max_samples)
    return run_gaussian_blur(x, runs, pack.send(x.device), out)


def _conv_chunk(x_shape: tuple[int, ...], element_size: int, device: torch.device) -> int | None:
    """Samples per blur convolution: on a CPU, ~:data:`CONV_CHUNK_BYTES` of padded input (cache-resident);
    elsewhere all at once."""
    if torch.device(device).type != "cpu":
        return None
    padded_bytes = x_shape[1] * (x_shape[2] + 12) * (x_shape[3] + 12) * element_size
    return max(1, CONV_CHUNK_BYTES // padded_bytes)


def plan_blur(
    pack: HostPack, apply: np.ndarray, sigma: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype, device
) -> list[BlurRun]:
    """The convolutions of :func:`blur` for host parameters (``apply`` bool ``[B]``, ``sigma`` ``[B]``) and
    images of ``shape`` on ``device``: one :func:`plan_gaussian_blur` per contiguous run of blurred samples."""
    max_samples = _conv_chunk(shape, dtype.itemsize, device)
    runs = []
    for start, stop in contiguous_runs(apply):
        runs += plan_gaussian_blur(pack, sigma[start:stop], *shape[2:], shape[1], dtype, max_samples, offset=start)
    return runs


def blur(x: Tensor, apply: Tensor, sigma: Tensor) -> Tensor:
    """Gaussian-blur the images where ``apply[b]`` with standard deviation ``sigma[b]`` (in place), one
    :func:`gaussian_blur` per contiguous run of blurred samples: fastest when the samples are sorted by kernel radius
    within each run (:func:`processing_order`)."""
    pack = HostPack()
    runs = plan_blur(pack, apply.cpu().numpy(), sigma.detach().cpu().numpy(), tuple(x.shape), x.dtype, x.device)
    return run_gaussian_blur(x, runs, pack.send(x.device), out=x) if runs else x
