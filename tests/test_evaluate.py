"""Scoring: accuracy, loss, per-class report and top-5 on known predictions."""
import numpy as np
import pytest

from cifar_pipeline.evaluate import predict_proba, score, tta_views


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
