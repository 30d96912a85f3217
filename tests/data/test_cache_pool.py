"""The image cache's multi-process decode pool under a parent that ignores SIGTERM (as submitit's handler does).

Forked workers inherit the parent's signal handlers; a pool that is ``terminate()``-d sends SIGTERM to workers that
may then ignore it and never exit, and the build hangs in ``join()``. The build must finish regardless.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils.data.folders import build_image_dataset
from utils.data.image_cache import CachedImages
from utils.data.synthetic import generate_synthetic_dataset

ROOT = Path(__file__).resolve().parents[2]
BUILDS = 10  # the hang is a race (it needs a worker still alive at terminate()); several builds make it near-certain

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from utils.data import image_cache
    from utils.data.folders import build_image_dataset

    def bypass(signum, frame):  # what submitit's handler does with SIGTERM
        print("Bypassing signal SIGTERM", flush=True)

    signal.signal(signal.SIGTERM, bypass)
    dataset = build_image_dataset(sys.argv[1], "train")
    for i in range(int(sys.argv[3])):
        cached = image_cache.cached_image_dataset(dataset, f"{sys.argv[2]}/{i}", name="train", verbose=False)
        print("built", i, len(cached), flush=True)
    print("parent", os.getpid(), flush=True)
    """
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("pool_data"), train_per_class=3, val_per_class=1)


def test_forced_pool_finishes_under_a_parent_that_ignores_sigterm(synthetic, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    env = {
        **os.environ,
        "TINYDINO_CACHE_WORKERS": "2",  # force the pool on for these 30 images
        "OMP_NUM_THREADS": "1",
        "D1_PID_DIR": str(pids),
    }
    site = tmp_path / "site"
    site.mkdir()
    # Record which processes decode (a file per pid), to check that the pool really ran.
    (site / "record_pids.py").write_text(
        textwrap.dedent(
            """
            import os
            from utils.data import image_cache
            real = image_cache._decode_image

            def recording(path, size):
                open(os.path.join(os.environ["D1_PID_DIR"], str(os.getpid())), "a").close()
                return real(path, size)

            image_cache._decode_image = recording
            """
        )
    )
    script = "import record_pids\n" + CHILD
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(synthetic), str(tmp_path / "cache"), str(BUILDS)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so a hung child and its workers can all be killed
    )
    try:
        out, err = child.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, err = child.communicate()
        pytest.fail(f"the cache build hung under a SIGTERM-ignoring parent; output:\n{out}\n{err[-2000:]}")
    assert child.returncode == 0, err[-3000:]
    assert [line for line in out.splitlines() if line.startswith("built")] == [f"built {i} 30" for i in range(BUILDS)]
    parent = int(next(line for line in out.splitlines() if line.startswith("parent")).split()[1])
    workers = {int(p.name) for p in pids.iterdir()}
    assert workers and parent not in workers, "TINYDINO_CACHE_WORKERS=2 decodes in worker processes"
    # and what the pool wrote is the decoded pixels
    entry = next((tmp_path / "cache" / "0").glob("train-*"))
    cached = CachedImages(entry)
    for row, (path, _) in enumerate(build_image_dataset(synthetic, "train").samples):
        with Image.open(path) as img:
            np.testing.assert_array_equal(cached.images[row], np.asarray(img.convert("RGB")).transpose(2, 0, 1))
