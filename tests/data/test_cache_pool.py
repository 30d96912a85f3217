"""The image cache's multi-process decode pool under a parent that ignores SIGTERM (as submitit's handler does).

Forked workers inherit the parent's signal handlers; a pool that is ``terminate()``-d sends SIGTERM to workers that
may then ignore it and never exit, and the build hangs in ``join()``. The build must finish regardless, and a worker
that dies must make the build fail, not wait forever. Each build runs in a child process with a time limit.
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

#: The child: a SIGTERM handler that ignores the signal, then ``argv[3]`` builds of the cache of ``argv[1]``.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import record_pids
    from utils.data import image_cache_build
    from utils.data.folders import build_image_dataset

    def bypass(signum, frame):  # what submitit's handler does with SIGTERM
        print("Bypassing signal SIGTERM", flush=True)

    signal.signal(signal.SIGTERM, bypass)
    print("parent", os.getpid(), flush=True)
    dataset = build_image_dataset(sys.argv[1], "train")
    for i in range(int(sys.argv[3])):
        cached = image_cache_build.cached_image_dataset(dataset, f"{sys.argv[2]}/{i}", name="train", verbose=False)
        print("built", i, len(cached), flush=True)
    """
)

#: Imported by the child: records which processes decode (a file per pid); kills the decoding process on the file
#: named by ``D1_KILL_ON`` when it is a worker (not the parent), as the OOM killer or a scheduler would.
RECORD_PIDS = textwrap.dedent(
    """
    import os, signal
    from utils.data import image_cache_build
    real = image_cache_build._decode_image
    parent = os.getpid()

    def recording(path, size):
        open(os.path.join(os.environ["D1_PID_DIR"], str(os.getpid())), "a").close()
        if os.getpid() != parent and os.path.basename(path) == os.environ.get("D1_KILL_ON"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, size)

    image_cache_build._decode_image = recording
    """
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("pool_data"), train_per_class=3, val_per_class=1)


def run_child(tmp_path: Path, data: Path, builds: int, timeout: float = 90, **env_extra: str):
    """Run :data:`CHILD` with 2 forced decode processes; ``(returncode, stdout, stderr, decoding pids)``. A child
    still running after ``timeout`` seconds is killed with its whole process group and the test fails."""
    pids, site = tmp_path / "pids", tmp_path / "site"
    pids.mkdir()
    site.mkdir()
    (site / "record_pids.py").write_text(RECORD_PIDS)
    env = {
        **os.environ,
        "TINYDINO_CACHE_WORKERS": "2",  # force the pool on for these 30 images
        "OMP_NUM_THREADS": "1",
        "D1_PID_DIR": str(pids),
        "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        **env_extra,
    }
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data), str(tmp_path / "cache"), str(builds)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so a hung child and its workers can all be killed
    )
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, err = child.communicate()
        pytest.fail(f"the cache build hung under a SIGTERM-ignoring parent; output:\n{out}\n{err[-2000:]}")
    return child.returncode, out, err, {int(p.name) for p in pids.iterdir()}


def test_forced_pool_finishes_under_a_parent_that_ignores_sigterm(synthetic, tmp_path):
    returncode, out, err, decoders = run_child(tmp_path, synthetic, BUILDS)
    assert returncode == 0, err[-3000:]
    assert [line for line in out.splitlines() if line.startswith("built")] == [f"built {i} 30" for i in range(BUILDS)]
    parent = int(out.splitlines()[0].split()[1])
    assert decoders and parent not in decoders, "TINYDINO_CACHE_WORKERS=2 decodes in worker processes"
    # and what the pool wrote is the decoded pixels
    cached = CachedImages(next((tmp_path / "cache" / "0").glob("train-*")))
    for row, (path, _) in enumerate(build_image_dataset(synthetic, "train").samples):
        with Image.open(path) as img:
            np.testing.assert_array_equal(cached.images[row], np.asarray(img.convert("RGB")).transpose(2, 0, 1))


def test_a_decode_process_that_dies_fails_the_build(synthetic, tmp_path):
    victim = Path(build_image_dataset(synthetic, "train").samples[17][0]).name
    returncode, out, err, _ = run_child(tmp_path, synthetic, 1, D1_KILL_ON=victim)
    assert returncode != 0 and "built" not in out
    assert "decode process" in err and "TINYDINO_CACHE_WORKERS=0" in err, err[-2000:]
    leftovers = [p for p in (tmp_path / "cache" / "0").iterdir()] if (tmp_path / "cache" / "0").exists() else []
    assert leftovers == [], "a failed build leaves no entry and no .building-* folder"
