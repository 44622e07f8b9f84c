"""Score a saved model on the test split: metrics, per-class report, confusion data, plots.

With many classes (CIFAR-100) the confusion matrix is ordered by superclass and
the most confused pairs are listed, since 10,000 cells cannot be read one by one.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import keras
import numpy as np
from sklearn.metrics import classification_report, confusion_matrix, log_loss, top_k_accuracy_score

from cifar_pipeline import atomic, plots
from cifar_pipeline.errors import PipelineError
from cifar_pipeline.features import MIRRORED_TEST, extractor_and_head, weights_digest
from cifar_pipeline.params import TTA_MODES
from cifar_pipeline.prepare import load_meta, load_split
from cifar_pipeline.saved_models import load_model

log = logging.getLogger(__name__)


def _shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate by (dy, dx) pixels, filling the edge by reflection as training's online shift does."""
    pad = max(abs(dy), abs(dx))
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    height, width = images.shape[1:3]
    return padded[:, pad - dy:pad - dy + height, pad - dx:pad - dx + width]


def tta_views(images: np.ndarray, tta: str) -> list[np.ndarray]:
    """`none`: the images; `flip`: and their mirror images; `flip_shift`: each of
    those also moved one pixel down-right and one pixel up-left (6 views)."""
    if tta not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation {tta!r}; allowed: {', '.join(TTA_MODES)}")
    views = [images]
    if tta in ("flip", "flip_shift"):
        views.append(images[:, :, ::-1])
    if tta == "flip_shift":
        views += [_shift(view, d, d) for view in views for d in (1, -1)]
    return views


def _view_average(model: keras.Model, views: list[np.ndarray], batch_size: int) -> np.ndarray:
    """`model`'s class probabilities averaged over the inputs `views` (one per TTA view)."""
    probs = np.mean([model.predict(view, batch_size=batch_size, verbose=0).astype(np.float64)
                     for view in views], axis=0)
    # float32 softmax sums drift from 1 by ~1e-7, which sklearn's log_loss warns about.
    return probs / probs.sum(axis=1, keepdims=True)


def predict_proba(model: keras.Model, images: np.ndarray, batch_size: int, tta: str) -> np.ndarray:
    """Class probabilities, averaged over the test-time augmentation views `tta`."""
    return _view_average(model, tta_views(images, tta), batch_size)


def cached_feature_probs(model: keras.Model, features_dir: Path, batch_size: int, tta: str) -> np.ndarray | None:
    """Test probabilities from the test features cached in `features_dir`, averaged over the
    views of `tta`, when `model` is a transfer model whose extractor computed them; else None
    (then its backbone must run on the images). A new head is scored in seconds this way."""
    parts = extractor_and_head(model)
    views = {"none": ["test"], "flip": ["test", MIRRORED_TEST]}.get(tta)
    meta_path = Path(features_dir) / "meta.json"
    if parts is None or views is None or not meta_path.exists():
        return None
    extractor, head = parts
    if json.loads(meta_path.read_text()).get("extractor_weights") != weights_digest(extractor):
        log.warning(f"evaluate: the model's feature extractor is not the one whose features are in {features_dir} "
              "(fine-tuned?): running it on the test images")
        return None
    log.info(f"evaluate: scoring the head on the cached test features in {features_dir}")
    return _view_average(head, [np.load(Path(features_dir) / f"{view}.npy") for view in views], batch_size)


def score(labels: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, log loss, top-5 accuracy (when > 5 classes) and per-class precision/recall/F1."""
    predicted = probs.argmax(axis=1)
    classes = np.arange(len(class_names))
    report = classification_report(labels, predicted, labels=classes, target_names=class_names,
                                   output_dict=True, zero_division=0)
    metrics = {
        "accuracy": round(float((predicted == labels).mean()), 4),
        "loss": round(float(log_loss(labels, np.clip(probs, 1e-12, 1), labels=classes)), 4),
        "macro_f1": round(report["macro avg"]["f1-score"], 4),
        "per_class": {name: {k: round(report[name][k], 4) for k in ("precision", "recall", "f1-score")}
                      for name in class_names},
    }
    if len(class_names) > 5:
        metrics["top5_accuracy"] = round(float(top_k_accuracy_score(labels, probs, k=5, labels=classes)), 4)
    return metrics


def write_predictions_csv(path: Path, labels: np.ndarray, predicted: np.ndarray, class_names: list[str]) -> None:
    """One row per test image: the data DVC's confusion template draws."""
    with atomic.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows((class_names[a], class_names[p]) for a, p in zip(labels, predicted))


def superclass_order(class_names: list[str], superclasses: list[str] | None) -> np.ndarray:
    """Class indices grouped by superclass (groups and classes alphabetical), so a
    100-class confusion matrix shows its errors as blocks along the diagonal."""
    if superclasses is None:
        return np.arange(len(class_names))
    return np.array(sorted(range(len(class_names)), key=lambda i: (superclasses[i], class_names[i])))


def most_confused(matrix: np.ndarray, top: int) -> list[tuple[int, int]]:
    """The `top` (true, predicted) pairs of different classes with the most test images, most first."""
    errors = matrix.copy()
    np.fill_diagonal(errors, 0)
    # Stable descending order: ties keep row-major order, so the list is reproducible.
    order = np.argsort(-errors, axis=None, kind="stable")[:top]
    return [(int(i), int(j)) for i, j in zip(*np.unravel_index(order, errors.shape)) if errors[i, j] > 0]


def write_confused_pairs_csv(path: Path, matrix: np.ndarray, class_names: list[str],
                             superclasses: list[str] | None, top: int) -> None:
    """The most frequent mistakes, with the share of the true class each one takes."""
    group = superclasses or [""] * len(class_names)
    with atomic.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted", "count", "share_of_actual", "actual_superclass",
                         "predicted_superclass"])
        for i, j in most_confused(matrix, top):
            writer.writerow([class_names[i], class_names[j], int(matrix[i, j]),
                             round(matrix[i, j] / max(matrix[i].sum(), 1), 4), group[i], group[j]])


def evaluate(*, model_path: Path, prepared_dir: Path, name: str, metrics_path: Path, per_class_path: Path,
             predictions_path: Path, confused_pairs_path: Path, confusion_png: Path, misclassified_png: Path,
             batch_size: int, tta: str, misclassified: int, confused_pairs: int,
             features_dir: Path | None = None) -> dict:
    """Evaluate one model on the test split and write its metrics and plots. A transfer model
    is scored on the test features cached in `features_dir` when they are its extractor's.

    Per-class scores go to their own file: in the metrics file they would add
    three columns per class to every `dvc metrics show` and `dvc exp show`.
    """
    meta = load_meta(prepared_dir)
    class_names, superclasses = meta["class_names"], meta.get("superclasses")
    test = load_split(prepared_dir, "test")
    model = load_model(model_path)
    probs = None if features_dir is None else cached_feature_probs(model, features_dir, batch_size, tta)
    if probs is None:
        probs = predict_proba(model, test.images, batch_size, tta)
    elif len(probs) != len(test.labels):
        raise PipelineError(f"{features_dir} holds features of {len(probs)} test images, {prepared_dir} has "
                            f"{len(test.labels)}: re-run the extract_features stage")
    predicted = probs.argmax(axis=1)
    metrics = score(test.labels, probs, class_names)
    metrics["test_images"] = int(len(test.labels))
    atomic.write_json(per_class_path, metrics.pop("per_class"))
    atomic.write_json(metrics_path, metrics)
    write_predictions_csv(predictions_path, test.labels, predicted, class_names)
    matrix = confusion_matrix(test.labels, predicted, labels=np.arange(len(class_names)))
    write_confused_pairs_csv(confused_pairs_path, matrix, class_names, superclasses, confused_pairs)
    order = superclass_order(class_names, superclasses)
    plots.confusion_heatmap(matrix[np.ix_(order, order)], [class_names[i] for i in order],
                            f"{name}: test accuracy {metrics['accuracy']:.2%}", confusion_png,
                            groups=None if superclasses is None else [superclasses[i] for i in order])
    wrong = np.flatnonzero(predicted != test.labels)[:misclassified]
    plots.image_grid(test.images[wrong],
                     [f"true {class_names[test.labels[i]]}\npred {class_names[predicted[i]]}" for i in wrong],
                     f"{name}: first {len(wrong)} misclassified test images", misclassified_png)
    return metrics
