"""Scoring: accuracy, loss, per-class report and top-5 on known predictions."""
import numpy as np
import pytest

from cifar_pipeline.evaluate import score


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
