"""``eval_knn.py`` and ``eval_linear.py`` end to end under torchrun with 2 processes, against the 1-process run."""

import json

import pytest
import torch

from tests.conftest import run_script

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def common_flags(data, checkpoint):
    return ["--pretrained_weights", str(checkpoint), "--data_path", str(data), "--image_size", "32"]


def test_eval_knn_two_processes_equal_one(small_synthetic, tiny_checkpoint, tmp_path):
    rows = {}
    for nproc in (1, 2):
        out = tmp_path / f"p{nproc}"
        flags = [*common_flags(small_synthetic, tiny_checkpoint), "--num_workers", "0", "--batch_size_per_gpu", "8"]
        flags += ["--device", "cpu", "--nb_knn", "1", "5", "20", "--output_dir", str(out)]
        result = run_script(["eval_knn.py", *flags, "--dump_features", str(out / "f")], nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        rows[nproc] = json.loads((out / "knn_results.json").read_text().splitlines()[-1])["results"]
    assert [r["k"] for r in rows[1]] == [1, 5, 20]
    assert rows[2] == rows[1]  # the same accuracies, for every k
    for name in ("trainfeat.pth", "testfeat.pth"):
        one, two = (torch.load(tmp_path / f"p{n}" / "f" / name, weights_only=True) for n in (1, 2))
        assert one.shape == two.shape and one.shape[0] in (40, 20)
        torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-5)
    for name in ("trainlabels.pth", "testlabels.pth"):
        one, two = (torch.load(tmp_path / f"p{n}" / "f" / name, weights_only=True) for n in (1, 2))
        assert torch.equal(one, two)


def test_eval_linear_two_processes_equal_one(small_synthetic, tiny_checkpoint, tmp_path):
    """The same global batch (1 x 8 images, 2 x 4 under DDP) gives the same probe. The official random crops are
    drawn per process, so both runs use the evaluation transform (``tests/eval/linear_worker.py``); everything
    else is the script: DistributedSampler shares (the union of the two ranks' step-t batches is the 1-process
    step-t batch), DDP's gradient average, the all-reduced validation and loss, the checkpoint."""
    logs, weights = {}, {}
    for nproc, batch in ((1, 8), (2, 4)):
        out = tmp_path / f"p{nproc}"
        flags = [*common_flags(small_synthetic, tiny_checkpoint), "--num_workers", "0", "--device", "cpu"]
        flags += ["--batch_size_per_gpu", str(batch), "--n_last_blocks", "2", "--avgpool_patchtokens", "True"]
        flags += ["--epochs", "2", "--lr", "2.0", "--output_dir", str(out)]
        result = run_script(["tests/eval/linear_worker.py", *flags], nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        logs[nproc] = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
        weights[nproc] = torch.load(out / "checkpoint.pth", weights_only=True)["state_dict"]
    assert [r["epoch"] for r in logs[1]] == [r["epoch"] for r in logs[2]] == [0, 1]
    for one, two in zip(logs[1], logs[2]):
        assert two["train_lr"] == one["train_lr"]  # lr 2.0 * global batch 8 / 256, then its cosine
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
        assert (two["test_acc1"], two["test_acc5"]) == (one["test_acc1"], one["test_acc5"])
        assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)
    assert logs[1][0]["train_lr"] == pytest.approx(2.0 * 8 / 256)
    assert set(weights[1]) == {"linear.weight", "linear.bias"}
    initial = torch.zeros_like(weights[1]["linear.bias"])
    assert not torch.equal(weights[1]["linear.bias"], initial)  # it trained
    for key in weights[1]:
        torch.testing.assert_close(weights[2][key], weights[1][key], rtol=1e-4, atol=1e-6)


def test_eval_linear_cached_two_processes_equal_one(small_synthetic, tiny_checkpoint, tmp_path):
    """The unpatched script: the features are extracted by both processes and gathered in dataset order, then the
    main process sweeps the learning rates alone, so both runs train on the same features."""
    results, heads = {}, {}
    for nproc in (1, 2):
        out = tmp_path / f"p{nproc}"
        flags = [*common_flags(small_synthetic, tiny_checkpoint), "--num_workers", "0", "--device", "cpu"]
        flags += ["--batch_size_per_gpu", "8", "--cache_features", "--lrs", "0.1", "1", "10", "--epochs", "3"]
        result = run_script(["eval_linear.py", *flags, "--output_dir", str(out)], nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        results[nproc] = json.loads((out / "linear_results.json").read_text().splitlines()[-1])
        heads[nproc] = torch.load(out / "linear_best.pth", weights_only=True)
    assert set(results[1]["per_lr"]) == {"0.1", "1.0", "10.0"}
    assert results[2]["per_lr"] == results[1]["per_lr"] and results[2]["best_lr"] == results[1]["best_lr"]
    for key, value in heads[1]["state_dict"].items():
        torch.testing.assert_close(heads[2]["state_dict"][key], value, rtol=1e-4, atol=1e-5)
