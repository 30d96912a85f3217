import pytest
import torch

import eval_knn
from tests.conftest import run_script
from tests.eval.test_eval_semantics import official_knn
from tests.helpers import eval_flags, read_json_lines
from utils.data.augment.per_image import eval_transform
from utils.data.folders import build_image_dataset
from utils.eval.features import FeatureDump
from utils.model.vit import build_backbone


@pytest.mark.distributed
def test_two_process_extraction_equals_one_process_in_order(small_synthetic, tmp_path):
    one, two = tmp_path / "one.pth", tmp_path / "two.pth"
    n = 23  # odd, and not a multiple of the batch: uneven shares and uneven last batches
    for path, nproc in ((one, 1), (two, 2)):
        result = run_script(["tests/eval/features_worker.py", str(small_synthetic), str(n), str(path)], nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    assert a["features"].shape == (n, 192)
    torch.testing.assert_close(a["features"], b["features"], rtol=1e-5, atol=1e-5)
    assert torch.equal(a["labels"], b["labels"])
    # Dataset order: the labels are those of the first n samples, and each row is that image's own feature.
    dataset = build_image_dataset(small_synthetic, "train", transform=eval_transform(32))
    assert a["labels"].tolist() == [dataset.targets[i] for i in range(n)]
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", patch_size=16, img_size=32).eval()
    with torch.no_grad():
        torch.testing.assert_close(b["features"][17], model(dataset[17][0][None])[0], rtol=1e-5, atol=1e-5)


def test_eval_knn_end_to_end_on_a_pretrained_checkpoint(small_synthetic, tiny_checkpoint, tmp_path, capsys):
    flags = eval_flags(tiny_checkpoint, small_synthetic, tmp_path, "--checkpoint_key", "teacher")
    flags += ["--nb_knn", "1", "5", "20", "--dump_features", str(tmp_path / "feats")]
    assert eval_knn.cli(flags) == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed
    record = read_json_lines(tmp_path / "knn_results.json")[-1]
    assert [r["k"] for r in record["results"]] == [1, 5, 20]
    for name in FeatureDump.FILES.values():
        assert (tmp_path / "feats" / name).is_file()
    # the numbers are official DINO's weighted k-NN (T = 0.07) of the dumped features, for every k
    dump = FeatureDump.load(tmp_path / "feats")
    for row in record["results"]:
        top1, top5, _ = official_knn(
            dump.train_features.double(),
            dump.train_labels,
            dump.test_features.double(),
            dump.test_labels,
            row["k"],
            0.07,
            10,
        )
        assert (row["top1"], row["top5"]) == (pytest.approx(top1), pytest.approx(top5))

    # Reloading the dumped features gives the same numbers, and appends a second record.
    assert eval_knn.cli([*flags[:-2], "--load_features", str(tmp_path / "feats")]) == 0
    records = read_json_lines(tmp_path / "knn_results.json")
    assert len(records) == 2 and records[1]["results"] == records[0]["results"]


def test_eval_knn_euclidean_uniform_matches_sklearn_on_dumped_features(small_synthetic, tiny_checkpoint, tmp_path):
    from sklearn.neighbors import KNeighborsClassifier

    feats = tmp_path / "feats"
    base = eval_flags(tiny_checkpoint, small_synthetic, tmp_path)
    base += ["--knn_metric", "euclidean", "--knn_weights", "uniform", "--nb_knn", "5"]
    rows = eval_knn.main(eval_knn.get_args_parser().parse_args([*base, "--dump_features", str(feats)]))
    dump = FeatureDump.load(feats)
    train, test, train_labels, test_labels = (
        dump.train_features,
        dump.test_features,
        dump.train_labels,
        dump.test_labels,
    )
    sk = KNeighborsClassifier(n_neighbors=5, metric="euclidean", algorithm="brute").fit(train, train_labels)
    assert rows[0]["top1"] == pytest.approx(100.0 * (sk.predict(test) == test_labels.numpy()).mean())


def test_wrong_checkpoint_key_lists_keys(small_synthetic, tiny_checkpoint, tmp_path):
    result = run_script(
        ["eval_knn.py", *eval_flags(tiny_checkpoint, small_synthetic, tmp_path, "--checkpoint_key", "nope")]
    )
    assert result.returncode == 2
    assert "no 'nope' entry" in result.stderr and "teacher" in result.stderr and "Traceback" not in result.stderr
