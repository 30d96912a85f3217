"""Scratch memory and sample bookkeeping shared by the batched augmentation's operations
(``utils/data/augment/batched.py``, ``utils/data/augment/color.py``)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from utils.data.augment.transfer import to_device

__all__ = ["Workspace", "contiguous_runs", "sample_indices", "scratch"]


class Workspace:
    """Scratch tensors kept from call to call, by name (each grown to the largest size asked for).

    On a CPU, every fresh multi-megabyte tensor is memory the kernel maps afresh, and the page faults of its first
    write cost about as much as an elementwise operation on it; reusing the working tensors of one chunk for the next
    (and for the next call) removes that cost. Not thread-safe: one workspace per thread. Not pickled (a data-loader
    worker starts with an empty one). Other devices do not need it (their allocators cache blocks).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()

    def __getstate__(self) -> dict:
        return {"_buffers": {}}


def scratch(ws: Workspace | None, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised float tensor of ``shape`` like ``like``: the workspace's ``name`` buffer, or a new one."""
    if ws is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return ws.get(name, shape, like.dtype, like.device)


def sample_indices(mask: np.ndarray | Tensor, device: torch.device) -> Tensor:
    """Positions (int64) of the true entries of a host parameter mask (found on the host, so that an accelerator
    is not synchronised), on ``device``."""
    mask = mask.cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    return to_device(torch.from_numpy(np.flatnonzero(mask).astype(np.int64)), device)


def contiguous_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous runs ``[start, stop)`` of the true entries of a 1-D bool array."""
    padded = np.zeros(len(mask) + 2, dtype=np.int8)
    padded[1:-1] = mask
    edges = np.flatnonzero(padded[1:] != padded[:-1]).tolist()
    return list(zip(edges[::2], edges[1::2], strict=True))
