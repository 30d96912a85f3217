import json
import subprocess
import sys

from tests.conftest import ROOT


def test_pretrain_benchmark_quick_mode_emits_valid_json(tmp_path):
    out = tmp_path / "pretrain.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_pretrain.py", "--quick", "--device", "cpu", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert json.loads(result.stdout.strip().splitlines()[-1]) == report
    assert set(report["images_per_s"]) == {"per_image_jpeg_worker", "cache_batched"}
    assert all(r["median"] > 0 for r in report["images_per_s"].values())
    assert report["speedup"] > 0
