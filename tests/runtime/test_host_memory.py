"""utils/runtime/host_memory.py: with freed memory retained, re-allocating large tensors stops page-faulting (the
kernel's minor-fault counter is the oracle), and computations are unchanged. Run in subprocesses: the setting is
global."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, resource, sys, torch
from utils.runtime.host_memory import retain_freed_memory
took = retain_freed_memory() if sys.argv[1] == "retain" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # a training step's pattern: large tensors alive together (above glibc's 32 MiB mmap limit), then freed
    a = torch.empty(48 << 18); a.fill_(1.0)
    b = torch.empty(40 << 18); b.fill_(1.0)
    c = torch.empty(8 << 18); c.fill_(1.0)
    del a, b, c
for _ in range(5):  # warm-up: the heap grows to the pattern's high-water mark
    step()
before = faults()
for _ in range(3):
    step()
total = faults() - before
g = torch.Generator().manual_seed(0)
a, b = torch.randn(300, 300, generator=g), torch.randn(300, 300, generator=g)
print(json.dumps({"took": took, "faults": total, "checksum": float((a @ b).sum())}))
"""


def probe(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's (elsewhere it does nothing)")
def test_retained_memory_is_reused_without_page_faults():
    default, retained = probe("default"), probe("retain")
    pages = 3 * ((48 + 40) << 20) // 4096
    assert default["faults"] > 0.9 * pages  # every fresh block above 32 MiB faults its pages in, every step
    assert retained["took"] is True
    assert retained["faults"] < 0.05 * pages
    assert retained["checksum"] == default["checksum"]  # how memory is recycled, never what is computed


def test_benchmark_mode_choice():
    from utils.runtime.host_memory import configure_host_memory

    assert configure_host_memory("default") == "default"
    with pytest.raises(ValueError, match="host memory mode"):
        configure_host_memory("jemalloc")
