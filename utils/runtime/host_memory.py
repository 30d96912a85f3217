"""Keep freed host memory mapped, so that a CPU run stops paying a page fault for every page of every fresh tensor.

glibc's ``malloc`` serves each allocation above ``M_MMAP_THRESHOLD`` (128 KiB at start, raised as large blocks are
freed, at most 32 MiB) with a fresh anonymous mapping that ``free`` unmaps again, and it gives the top of its heap
back to the system once more than ``M_TRIM_THRESHOLD`` of it is free. Memory handed back is mapped afresh on the
next allocation, and the first write to each of its 4 KiB pages is a page fault; every step of CPU training
allocates its activations anew.

:func:`retain_freed_memory` raises both thresholds (``mallopt``), so that freed blocks stay in the heap and are
reused without faults: what the jemalloc or tcmalloc preloads of PyTorch's CPU performance guide achieve, without a
preload. The price: the process keeps the high-water mark of its heap (resident memory does not shrink after a
peak). It changes how memory is recycled, never what is computed. Elsewhere than glibc (macOS, musl) it does
nothing. Data-loader workers started by ``fork`` inherit the setting.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

#: ``mallopt`` parameters (glibc's ``malloc.h``).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: Allocations up to this size come from the heap (larger ones are still mapped and unmapped).
RETAIN_UP_TO_BYTES = 1 << 30


def retain_freed_memory(up_to_bytes: int = RETAIN_UP_TO_BYTES) -> bool:
    """Make glibc keep freed blocks of up to ``up_to_bytes`` for reuse and never trim its heap; returns whether the
    setting took effect (False on other C libraries)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    limit = min(int(up_to_bytes), 2**31 - 1)
    return bool(mallopt(M_MMAP_THRESHOLD, limit)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


#: Choices of the benchmarks' host-memory flag: ``retain`` (what CPU training does, see ``train_dino``) or glibc's
#: ``default`` behaviour.
HOST_MEMORY_MODES = ("retain", "default")


def configure_host_memory(mode: str) -> str:
    """Apply a benchmark's ``--host_memory`` choice; returns the mode in effect (``default`` where retaining is not
    available). The setting is process-wide: every path a benchmark compares runs under it."""
    if mode not in HOST_MEMORY_MODES:
        raise ValueError(f"host memory mode must be one of {HOST_MEMORY_MODES}, got {mode!r}")
    return "retain" if mode == "retain" and retain_freed_memory() else "default"
