"""Scoring: accuracy, loss, per-class report and top-5 on known predictions; confusion reports;
a transfer model scored on its cached test features."""
import numpy as np
import pytest

import csv

from cifar_pipeline.evaluate import (most_confused, predict_proba, score, superclass_order, tta_views,
                                     write_confused_pairs_csv)


def test_score_on_known_predictions():
    labels = np.array([0, 0, 1, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    metrics = score(labels, probs, ["a", "b", "c"])
    assert metrics["accuracy"] == 0.75
    assert metrics["loss"] == pytest.approx(-np.mean(np.log([0.8, 0.2, 0.8, 0.8])), abs=1e-4)
    assert metrics["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1-score": pytest.approx(0.6667, abs=1e-4)}
    assert metrics["per_class"]["b"]["precision"] == 0.5
    assert "top5_accuracy" not in metrics


def test_top5_accuracy_with_many_classes():
    labels = np.array([0, 1])
    probs = np.tile(np.linspace(1, 0.1, 10), (2, 1))  # ranks classes 0..9 in order
    probs[1] = probs[1][::-1]                          # class 1 ranked 9th for the second image
    metrics = score(labels, probs / probs.sum(1, keepdims=True), [str(i) for i in range(10)])
    assert metrics["accuracy"] == 0.5 and metrics["top5_accuracy"] == 0.5


def test_tta_views_mirror_and_shift_like_training():
    images = np.arange(2 * 5 * 5 * 3, dtype=np.uint8).reshape(2, 5, 5, 3)
    assert len(tta_views(images, "none")) == 1
    original, mirrored = tta_views(images, "flip")
    np.testing.assert_array_equal(mirrored[:, :, 0], images[:, :, -1])
    views = tta_views(images, "flip_shift")
    assert len(views) == 6
    down_right, up_left = views[2], views[3]
    # Moved by one pixel; the uncovered edge is filled by reflection, as the online shift pads.
    np.testing.assert_array_equal(down_right[:, 1:, 1:], images[:, :-1, :-1])
    np.testing.assert_array_equal(down_right[:, 0, 1:], images[:, 1, :-1])
    np.testing.assert_array_equal(up_left[:, :-1, :-1], images[:, 1:, 1:])
    np.testing.assert_array_equal(views[4][:, 1:, 1:], mirrored[:, :-1, :-1])
    with pytest.raises(ValueError, match="allowed: none, flip, flip_shift"):
        tta_views(images, "rotate")


def test_predictions_average_over_the_views():
    class Brightness:
        """A stand-in model whose probabilities depend on the top-left pixel."""

        def predict(self, images, batch_size, verbose):
            p = images[:, 0, 0, 0].astype(np.float32) / 255
            return np.stack([p, 1 - p], axis=1)

    images = np.zeros((1, 4, 4, 3), np.uint8)
    images[0, 0, 0] = 255
    assert predict_proba(Brightness(), images, 8, "none")[0, 0] == pytest.approx(1.0)
    # The mirror view moves the bright pixel to the top-right corner.
    assert predict_proba(Brightness(), images, 8, "flip")[0, 0] == pytest.approx(0.5)


def test_superclass_order_groups_classes_and_keeps_cifar10_order():
    names = ["oak", "bee", "maple", "ant"]
    assert superclass_order(names, None).tolist() == [0, 1, 2, 3]
    groups = ["trees", "insects", "trees", "insects"]
    assert [names[i] for i in superclass_order(names, groups)] == ["ant", "bee", "maple", "oak"]


def test_most_confused_pairs_in_order_with_shares(tmp_path):
    matrix = np.array([[5, 3, 0],
                       [1, 8, 0],
                       [4, 0, 2]])
    assert most_confused(matrix, top=5) == [(2, 0), (0, 1), (1, 0)]  # diagonal and zero cells left out
    assert most_confused(matrix, top=1) == [(2, 0)]
    path = tmp_path / "pairs.csv"
    write_confused_pairs_csv(path, matrix, ["cat", "dog", "fox"], ["pets", "pets", "wild"], top=2)
    rows = list(csv.DictReader(path.open()))
    assert [(r["actual"], r["predicted"], r["count"]) for r in rows] == [("fox", "cat", "4"), ("cat", "dog", "3")]
    assert float(rows[0]["share_of_actual"]) == pytest.approx(4 / 6, abs=1e-4)
    assert rows[0]["actual_superclass"] == "wild" and rows[0]["predicted_superclass"] == "pets"


def _outputs(directory):
    """evaluate()'s output paths, all in `directory`."""
    return {k: directory / v for k, v in dict(
        metrics_path="m.json", per_class_path="pc.json", predictions_path="p.csv", confused_pairs_path="cp.csv",
        confusion_png="c.png", misclassified_png="w.png").items()}


def test_cifar100_evaluation_reports_top5_and_superclass_pairs(cifar100_archive, tmp_path):
    from cifar_pipeline.evaluate import evaluate
    from cifar_pipeline.models import build_model
    from cifar_pipeline.prepare import prepare

    archive, _ = cifar100_archive
    meta = prepare(archive, tmp_path / "prepared", "cifar100", "fine", val_fraction=0.25, limit=None, seed=0)
    assert meta["superclasses"][:2] == ["coarse0", "coarse1"]
    model = build_model("ann", 100, meta["mean"], meta["std"])
    model.save(tmp_path / "m.keras")
    out = _outputs(tmp_path)
    metrics = evaluate(model_path=tmp_path / "m.keras", prepared_dir=tmp_path / "prepared", name="t",
                       batch_size=64, tta="none", misclassified=4, confused_pairs=10, **out)
    assert "top5_accuracy" in metrics and metrics["test_images"] == 200
    rows = list(csv.DictReader(out["confused_pairs_path"].open()))
    assert 0 < len(rows) <= 10
    for row in rows:  # synthetic superclass of fine class i is coarse(i % 20)
        assert row["actual_superclass"] == f"coarse{int(row['actual'][4:]) % 20}"
    assert out["confusion_png"].read_bytes()[:4] == b"\x89PNG"


def test_transfer_head_is_scored_on_the_cached_test_features_unless_the_extractor_changed(
        training_data, tmp_path, monkeypatch, caplog):
    import logging

    import keras

    from cifar_pipeline import evaluate as evaluation
    from cifar_pipeline.features import extract_features, transfer_model
    from cifar_pipeline.head import build_head

    caplog.set_level(logging.INFO, logger="cifar_pipeline")

    keras.utils.set_random_seed(0)
    extract_features(prepared_dir=training_data / "prepared", features_dir=tmp_path / "features",
                     extractor_path=tmp_path / "extractor.keras", backbone="mobilenet_v2", image_size=32,
                     weights="none", mid_level_features=False, mirrored_train=False, batch_size=16)
    extractor = keras.models.load_model(tmp_path / "extractor.keras")
    train = np.load(tmp_path / "features" / "train.npy")
    head = build_head("dense", train.mean(axis=0), train.var(axis=0), 10, units=8, dropout=0.0)
    transfer_model(extractor, head).save(tmp_path / "transfer.keras")

    def run(model_path, **kwargs):
        out = _outputs(tmp_path)
        metrics = evaluation.evaluate(model_path=model_path, prepared_dir=training_data / "prepared", name="t",
                                      batch_size=64, tta="flip", misclassified=4, confused_pairs=5, **out, **kwargs)
        return metrics, out["predictions_path"].read_text()

    on_images = run(tmp_path / "transfer.keras")
    backbone_runs = []
    real_predict_proba = evaluation.predict_proba
    monkeypatch.setattr(evaluation, "predict_proba", lambda *a, **k: backbone_runs.append(1) or real_predict_proba(
        *a, **k))
    on_features = run(tmp_path / "transfer.keras", features_dir=tmp_path / "features")
    assert not backbone_runs and "cached test features" in caplog.text
    assert on_features[1] == on_images[1]  # the same prediction for every test image
    assert on_features[0]["loss"] == pytest.approx(on_images[0]["loss"], rel=1e-4)

    tuned = keras.models.load_model(tmp_path / "transfer.keras")  # as fine-tuning leaves it: another backbone
    layer = next(layer for layer in tuned.layers[1].layers[-1].layers if layer.get_weights())
    layer.set_weights([w * 1.5 for w in layer.get_weights()])
    tuned.save(tmp_path / "tuned.keras")
    run(tmp_path / "tuned.keras", features_dir=tmp_path / "features")
    assert backbone_runs == [1] and "not the one whose features" in caplog.text
