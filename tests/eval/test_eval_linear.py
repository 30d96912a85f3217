import json

import pytest
import torch

import eval_linear
from utils.eval.linear_probe import LinearClassifierGrid, linear_features, topk_correct, train_grid_on_features
from utils.model.vit import build_backbone


def separable(n_train, n_val, dim=24, classes=6):
    """Gaussian clusters around well-separated centres: linearly separable up to rare outliers."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, dim, generator=generator) * 3
    train_y, val_y = torch.arange(n_train) % classes, torch.arange(n_val) % classes
    train_x = centres[train_y] + torch.randn(n_train, dim, generator=generator)
    val_x = centres[val_y] + torch.randn(n_val, dim, generator=generator)
    return train_x, train_y, val_x, val_y


def test_probe_on_linearly_separable_features_reaches_95_percent():
    train_x, train_y, val_x, val_y = separable(600, 300)
    result = train_grid_on_features(
        train_x, train_y, val_x, val_y, [1e-6, 0.1], epochs=10, num_classes=6, batch_size=64
    )
    assert result["best_top1"] >= 95.0
    assert result["top1"][0] < 60.0  # a head with a negligible lr stays near its random init: heads are separate
    assert result["best_lr"] == 0.1


def test_grid_heads_are_independent_classifiers():
    grid = LinearClassifierGrid(8, 3, n_heads=2)
    x = torch.randn(5, 8)
    out = grid(x)
    assert out.shape == (2, 5, 3)
    torch.testing.assert_close(out[1], grid.heads[1](x))


def test_topk_correct_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    c1, c5 = topk_correct(logits, labels)
    assert c1.item() == 1 and c5.item() == 3


@pytest.mark.parametrize("n, avgpool, expected", [(1, False, 192), (4, False, 768), (4, True, 960), (2, True, 576)])
def test_linear_features_all_combinations(n, avgpool, expected):
    model = build_backbone("vit_tiny", 16, 32).eval()
    with torch.no_grad():
        feats = linear_features(model, torch.randn(2, 3, 32, 32), n, avgpool)
        assert feats.shape == (2, expected)
        layers = model.get_intermediate_layers(torch.randn(2, 3, 32, 32), 1)
        assert layers[0].shape[1] == 5


def read_log(path):
    return [json.loads(line) for line in (path / "log.txt").read_text().splitlines()]


def test_eval_linear_end_to_end_and_resume(small_synthetic, tiny_checkpoint, tmp_path):
    out = tmp_path / "linear"
    flags = [
        "--pretrained_weights",
        str(tiny_checkpoint),
        "--data_path",
        str(small_synthetic),
        "--image_size",
        "32",
        "--num_workers",
        "0",
        "--batch_size_per_gpu",
        "16",
        "--n_last_blocks",
        "2",
        "--avgpool_patchtokens",
        "True",
        "--output_dir",
        str(out),
    ]
    assert eval_linear.main([*flags, "--epochs", "1"]) == 0
    assert [r["epoch"] for r in read_log(out)] == [0]
    assert eval_linear.main([*flags, "--epochs", "2"]) == 0
    records = read_log(out)
    assert [r["epoch"] for r in records] == [0, 1]  # resumed: epoch 0 not trained again
    assert {"train_loss", "test_acc1", "test_acc5"} <= set(records[-1])
    result = json.loads((out / "linear_results.json").read_text().splitlines()[-1])
    assert 0 <= result["best_acc"] <= 100


def test_eval_linear_cached_features_sweep(small_synthetic, tiny_checkpoint, tmp_path):
    out = tmp_path / "cached"
    flags = [
        "--pretrained_weights",
        str(tiny_checkpoint),
        "--data_path",
        str(small_synthetic),
        "--image_size",
        "32",
        "--num_workers",
        "0",
        "--output_dir",
        str(out),
        "--cache_features",
        "--lrs",
        "0.01",
        "0.1",
        "1",
        "--epochs",
        "3",
        "--optimizer",
        "adam",
    ]
    assert eval_linear.main(flags) == 0
    result = json.loads((out / "linear_results.json").read_text().splitlines()[-1])
    assert result["mode"] == "cached" and set(result["per_lr"]) == {"0.01", "0.1", "1.0"}
    assert result["best_acc"] == max(result["per_lr"].values())
    assert (out / "linear_best.pth").is_file()


def test_lrs_without_cache_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        eval_linear.main(["--lrs", "0.1", "1"])
    assert exc.value.code == 2 and "--cache_features" in capsys.readouterr().err
