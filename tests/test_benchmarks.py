import pytest

from tests.conftest import run_benchmark_quick


@pytest.mark.slow
def test_pretrain_benchmark_quick_mode_emits_valid_json(tmp_path):
    report, _ = run_benchmark_quick("bench_pretrain.py", ["--device", "cpu"], tmp_path / "pretrain.json", 600)
    rates = report["images_per_s"]
    assert set(rates) == {"per_image_jpeg_worker", "cache_batched"}
    for r in rates.values():  # the summary is of the rates it reports (median by hand)
        v = sorted(r["all"])
        assert v[0] > 0 and (r["min"], r["max"]) == (v[0], v[-1])
        assert r["median"] == (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2
    assert report["speedup"] == rates["cache_batched"]["median"] / rates["per_image_jpeg_worker"]["median"]


def test_last_layer_benchmark_quick_mode_emits_valid_json(tmp_path):
    report, stdout = run_benchmark_quick("bench_last_layer.py", ["--threads", "1"], tmp_path / "last_layer.json")
    assert set(report["seconds"]) == {"fused", "official", "composed"}
    seconds = report["seconds"]
    for timing in seconds.values():
        v = sorted(timing["all"])
        assert len(v) == report["config"]["repeats"] and v[0] > 0 and (timing["min"], timing["max"]) == (v[0], v[-1])
        assert timing["median"] == (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2
    assert report["speedup_vs_fused"] == {k: t["median"] / seconds["fused"]["median"] for k, t in seconds.items()}
    assert "official" in stdout and report["config"]["host_memory"] in ("retain", "default")
