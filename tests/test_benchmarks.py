from tests.conftest import run_benchmark_quick


def test_pretrain_benchmark_quick_mode_emits_valid_json(tmp_path):
    report, _ = run_benchmark_quick("bench_pretrain.py", ["--device", "cpu"], tmp_path / "pretrain.json", 600)
    assert set(report["images_per_s"]) == {"per_image_jpeg_worker", "cache_batched"}
    assert all(r["median"] > 0 for r in report["images_per_s"].values())
    assert report["speedup"] > 0
