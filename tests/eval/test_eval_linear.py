import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import eval_linear
from tests.helpers import eval_flags, read_json_lines
from utils.data.augment.per_image import eval_transform
from utils.data.folders import build_image_dataset
from utils.eval.features import TokenFeatures
from utils.eval.linear_probe import LinearClassifierGrid, topk_correct, train_epoch, train_grid_on_features
from utils.model.vit import build_backbone
from utils.model.weights import build_pretrained_backbone
from utils.runtime.monitoring import ProgressMeter


def overlapping_clusters(n_train, n_val, dim=24, classes=6):
    """Gaussian clusters with overlapping centres: a linear classifier reaches about 90 %, not 100 %."""
    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(classes, dim, generator=generator) * 0.6
    train_y, val_y = torch.arange(n_train) % classes, torch.arange(n_val) % classes
    train_x = centres[train_y] + torch.randn(n_train, dim, generator=generator)
    val_x = centres[val_y] + torch.randn(n_val, dim, generator=generator)
    return train_x, train_y, val_x, val_y


def test_cached_probe_matches_scikit_learn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    train_x, train_y, val_x, val_y = overlapping_clusters(600, 300)
    result = train_grid_on_features(
        train_x, train_y, val_x, val_y, [1e-6, 0.1], epochs=30, num_classes=6, batch_size=64
    )
    sk = LogisticRegression(max_iter=2000).fit(train_x.numpy(), train_y.numpy())
    sk_pred = sk.predict(val_x.numpy())
    sk_top1 = 100.0 * (sk_pred == val_y.numpy()).mean()
    assert sk_top1 > 60.0  # learnable, and not saturated: the comparison below can fail
    assert result["best_lr"] == 0.1
    assert abs(result["best_top1"] - sk_top1) <= 3.0
    with torch.no_grad():
        ours = result["grid"](val_x)[result["best_index"]].argmax(dim=1).numpy()
    assert (ours == sk_pred).mean() >= 0.9
    assert result["top1"][0] < 30.0  # a head with a negligible lr stays near chance (16.7 %): heads are separate


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


def official_probe_features(model, images, n_last_blocks, avgpool_patchtokens):
    """Official DINO ``eval_linear.py``: the CLS tokens of the last n blocks' ``get_intermediate_layers`` outputs,
    concatenated; with avgpool the mean of the last block's patch tokens (``[:, 1:]``) appended."""
    intermediate_output = model.get_intermediate_layers(images, n_last_blocks)
    output = torch.cat([x[:, 0] for x in intermediate_output], dim=-1)
    if avgpool_patchtokens:
        output = torch.cat((output, torch.mean(intermediate_output[-1][:, 1:], dim=1)), dim=-1)
    return output


@pytest.mark.parametrize("n, avgpool", [(1, False), (4, False), (1, True), (2, True)])
def test_probe_flags_select_the_official_features(n, avgpool):
    model = build_backbone("vit_tiny", 16, 32).eval()
    assert model.num_prefix_tokens == 1  # the official [:, 1:] patch tokens
    args = eval_linear.get_args_parser().parse_args(["--n_last_blocks", str(n), "--avgpool_patchtokens", str(avgpool)])
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = eval_linear.feature_selector(args)(model, images)
        expected = official_probe_features(model, images, n, avgpool)
    assert ours.shape == (3, (n + avgpool) * 192) == expected.shape
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    assert eval_linear.feature_selector(args).dim(192) == ours.shape[1]


def test_knn_features_are_the_backbone_output():
    """Official DINO's k-NN feature is ``model(images)``: the last block's normalised CLS token."""
    model = build_backbone("vit_tiny", 16, 32).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(TokenFeatures()(model, images), model(images), rtol=1e-6, atol=1e-6)
        patch = model.get_intermediate_layers(images, 1)[0][:, 1:].mean(dim=1)
        torch.testing.assert_close(TokenFeatures(use_cls=False)(model, images), patch, rtol=0, atol=0)


def test_trainer_first_sgd_step_is_the_closed_form_gradient_step():
    """One full batch, SGD (momentum has no effect on the first step): W <- W - lr * (softmax(xW^T + b) - onehot)^T x
    / B, b <- b - lr * mean(softmax - onehot), for each head with its own lr."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 5, generator=generator, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    grid = LinearClassifierGrid(5, 3, n_heads=2).double()
    lrs = [0.1, 0.7]
    before = [(h.linear.weight.detach().clone(), h.linear.bias.detach().clone()) for h in grid.heads]
    optimizer = torch.optim.SGD(
        [{"params": list(h.parameters()), "lr": lr} for h, lr in zip(grid.heads, lrs)], momentum=0.9
    )
    loss = train_epoch(grid, optimizer, [(x, y)])
    expected_losses = []
    for (w, b), head, lr in zip(before, grid.heads, lrs):
        p = torch.softmax(x @ w.T + b, dim=1)
        expected_losses.append(-torch.log(p[torch.arange(8), y]).mean())
        residual = (p - torch.nn.functional.one_hot(y, 3).double()) / 8
        torch.testing.assert_close(head.linear.weight.detach(), w - lr * residual.T @ x)
        torch.testing.assert_close(head.linear.bias.detach(), b - lr * residual.sum(dim=0))
    torch.testing.assert_close(loss, torch.stack(expected_losses).mean())


def test_eval_linear_end_to_end_and_resume(small_synthetic, tiny_checkpoint, tmp_path):
    out = tmp_path / "linear"
    flags = eval_flags(tiny_checkpoint, small_synthetic, out, "--batch_size_per_gpu", "16")
    flags += ["--n_last_blocks", "2", "--avgpool_patchtokens", "True"]
    flags += ["--lr", "0.256"]  # SGD: scaled by the global batch, 0.256 * 16 / 256 = 0.016
    assert eval_linear.cli([*flags, "--epochs", "1"]) == 0
    assert [r["epoch"] for r in read_json_lines(out / "log.txt")] == [0]
    assert read_json_lines(out / "log.txt")[0]["train_lr"] == pytest.approx(0.016)
    assert eval_linear.cli([*flags, "--epochs", "2"]) == 0
    records = read_json_lines(out / "log.txt")
    assert [r["epoch"] for r in records] == [0, 1]  # resumed: epoch 0 not trained again
    # the resumed run follows the cosine schedule of a 2-epoch run: lr(e) = lr0 * (1 + cos(pi * e / epochs)) / 2
    assert records[1]["train_lr"] == pytest.approx(0.016 * (1 + math.cos(math.pi * 1 / 2)) / 2)
    result = read_json_lines(out / "linear_results.json")[-1]
    assert result["best_acc"] == max(r["test_acc1"] for r in records)

    # the logged validation is that of the saved classifier on the official features of the val images
    backbone = build_pretrained_backbone("vit_tiny", 16, 32, str(tiny_checkpoint), checkpoint_key="teacher").eval()
    val = build_image_dataset(small_synthetic, "val", transform=eval_transform(32))
    images = torch.stack([val[i][0] for i in range(len(val))])
    labels = torch.tensor(val.targets)
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    with torch.no_grad():
        logits = official_probe_features(backbone, images, 2, True) @ state["state_dict"]["linear.weight"].T
        logits += state["state_dict"]["linear.bias"]
    top1 = 100.0 * (logits.argmax(dim=1) == labels).double().mean().item()
    top5 = 100.0 * (logits.topk(5, dim=1).indices == labels[:, None]).any(dim=1).double().mean().item()
    assert (records[-1]["test_acc1"], records[-1]["test_acc5"]) == (pytest.approx(top1), pytest.approx(top5))
    assert records[-1]["test_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-4)
    assert state["epoch"] == 2 and "scheduler" not in state


def test_eval_linear_cached_features_sweep(small_synthetic, tiny_checkpoint, tmp_path):
    out = tmp_path / "cached"
    flags = [
        *eval_flags(tiny_checkpoint, small_synthetic, out),
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
    assert eval_linear.cli(flags) == 0
    result = read_json_lines(out / "linear_results.json")[-1]
    assert result["mode"] == "cached" and set(result["per_lr"]) == {"0.01", "0.1", "1.0"}
    assert result["best_acc"] == max(result["per_lr"].values())
    assert (out / "linear_best.pth").is_file()


def test_lrs_without_cache_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        eval_linear.cli(["--lrs", "0.1", "1"])
    assert exc.value.code == 2 and "--cache_features" in capsys.readouterr().err


class CountScalarReads(TorchDispatchMode):
    """Counts device-to-host scalar reads (``.item()``, ``float(t)``, ``bool(t)`` go through _local_scalar_dense)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_probe_training_reads_the_loss_only_at_print_steps():
    """10 steps printed every 5: two host reads of the loss (steps 5 and 10), none on the other steps."""
    grid = LinearClassifierGrid(6, 3, n_heads=1)
    optimizer = torch.optim.SGD(grid.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 6, generator=generator), torch.tensor([0, 1, 2, 0])) for _ in range(10)]
    meter = ProgressMeter(len(batches), "Epoch [0/1]", torch.device("cpu"), print_freq=5)
    with CountScalarReads() as counter:
        loss = eval_linear.train_epoch(grid, optimizer, batches, eval_linear.progress(meter, 4, 0.1))
    assert counter.reads == 2
    assert meter.done == 10 and loss.ndim == 0


def test_frozen_backbone_runs_under_the_precision_autocast():
    seen = []

    def selector(backbone, images):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return backbone(images)

    loader = [(torch.randn(2, 5), torch.tensor([0, 1]))]
    backbone = torch.nn.Linear(5, 3)
    for precision, expected in (("bf16", (True, torch.bfloat16)), ("fp32", (False, None))):
        seen.clear()
        (features, labels), *_ = eval_linear.frozen_features(backbone, selector, loader, torch.device("cpu"), precision)
        assert seen[0][0] == expected[0] and (expected[1] is None or seen[0][1] == expected[1])
        assert features.dtype == torch.float32 and not features.requires_grad
