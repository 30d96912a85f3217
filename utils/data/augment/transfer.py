"""Host→device transfers of the batched augmentation and the cached loader: every one goes through :func:`to_device`.

The parameters of one view (crop positions, colour factors, blur kernels, sample indices) are host arrays; a
:class:`HostPack` gathers them into one byte buffer, pinned when the target is a CUDA device, sent with one
non-blocking copy; :class:`DevicePack` hands out each array as a typed view of the device buffer.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["DevicePack", "HostPack", "Slot", "pinned_empty", "to_device"]

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.int64: np.int64, torch.bool: np.bool_}
#: Alignment of each array in a pack (bytes): any dtype's view of a slice at that offset is valid.
ALIGN = 8


def _pins(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised host tensor to fill and send to ``device``: page-locked when ``device`` is a CUDA device
    (PyTorch's caching host allocator keeps it alive until a non-blocking copy from it has finished)."""
    return torch.empty(shape, dtype=dtype, pin_memory=_pins(torch.device(device)))


def to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """``tensor`` on ``device`` (itself when it is there already), copied with ``non_blocking=True``, from
    page-locked memory for a CUDA device (an unpinned host tensor is pinned first). The one place where the batched
    augmentation and the cached loader move host data to the device: call it on host tensors only."""
    device = torch.device(device)
    if _pins(device) and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class Slot:
    """Where one array lies in a pack: byte ``offset``, ``dtype``, ``shape``."""

    __slots__ = ("dtype", "offset", "shape")

    def __init__(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]):
        self.offset, self.dtype, self.shape = offset, dtype, shape


class HostPack:
    """Host arrays gathered for one transfer: :meth:`add` each (NumPy arrays or CPU tensors; a :class:`Slot` comes
    back), then :meth:`send` them all to a device in one copy."""

    def __init__(self) -> None:
        self._arrays: list[tuple[int, np.ndarray]] = []
        self._nbytes = 0

    def add(self, array: np.ndarray | Tensor, dtype: torch.dtype | None = None) -> Slot:
        """Queue ``array`` (converted to ``dtype`` when given); returns its slot."""
        if isinstance(array, Tensor):
            array = array.detach().cpu().numpy()
        array = np.ascontiguousarray(array)
        if dtype is not None:
            array = array.astype(_NUMPY_DTYPES[dtype], copy=False)
        offset = -(-self._nbytes // ALIGN) * ALIGN
        self._arrays.append((offset, array))
        self._nbytes = offset + array.nbytes
        return Slot(offset, torch.from_numpy(array[:0]).dtype, array.shape)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def send(self, device: torch.device | str) -> DevicePack:
        """One host buffer (pinned for CUDA) holding every array, copied to ``device`` with one :func:`to_device`."""
        device = torch.device(device)
        host = pinned_empty((max(self._nbytes, ALIGN),), torch.uint8, device)
        staging = host.numpy()
        for offset, array in self._arrays:
            staging[offset : offset + array.nbytes] = array.reshape(-1).view(np.uint8)
        return DevicePack(to_device(host, device))


class DevicePack:
    """The device buffer of a sent :class:`HostPack`; ``pack[slot]`` is that array as a typed device tensor (a view
    of the buffer, no copy)."""

    def __init__(self, buffer: Tensor):
        self.buffer = buffer

    def __getitem__(self, slot: Slot) -> Tensor:
        nbytes = math.prod(slot.shape) * slot.dtype.itemsize
        return self.buffer[slot.offset : slot.offset + nbytes].view(slot.dtype).view(slot.shape)
