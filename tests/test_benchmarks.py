from tests.conftest import run_benchmark_quick


def test_pretrain_benchmark_quick_mode_emits_valid_json(tmp_path):
    report, _ = run_benchmark_quick("bench_pretrain.py", ["--device", "cpu"], tmp_path / "pretrain.json", 600)
    assert set(report["images_per_s"]) == {"per_image_jpeg_worker", "cache_batched"}
    assert all(r["median"] > 0 for r in report["images_per_s"].values())
    assert report["speedup"] > 0


def test_last_layer_benchmark_quick_mode_emits_valid_json(tmp_path):
    report, stdout = run_benchmark_quick("bench_last_layer.py", ["--threads", "1"], tmp_path / "last_layer.json")
    assert set(report["seconds"]) == {"fused", "official", "composed"}
    for timing in report["seconds"].values():
        assert len(timing["all"]) == report["config"]["repeats"] and timing["median"] > 0
    assert report["speedup_vs_fused"]["fused"] == 1.0
    assert "official" in stdout and report["config"]["host_memory"] in ("retain", "default")
