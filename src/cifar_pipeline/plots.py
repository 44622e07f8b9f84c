"""PNG figures people look at rather than read: samples, augmentations, curves, confusion."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # stages run headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from cifar_pipeline import atomic  # noqa: E402

# No timestamp or version in the file, so equal figures are equal bytes.
_PNG_METADATA = {"Software": None}


def _save(fig, path: Path) -> None:
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata=_PNG_METADATA, bbox_inches="tight")
    plt.close(fig)


def image_grid(images: np.ndarray, titles: list[str], title: str, path: Path, columns: int = 8) -> None:
    """A grid of images, each with a short caption."""
    rows = max(1, math.ceil(len(images) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.4, rows * 1.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, titles):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(caption, fontsize=7)
    fig.suptitle(title if len(images) else f"{title} (none)")
    _save(fig, path)


def samples_per_class(images: np.ndarray, labels: np.ndarray, class_names: list[str], path: Path,
                      per_class: int = 8, max_classes: int = 20) -> None:
    """A row of sample training images for each class (the first `max_classes` classes)."""
    shown = class_names[:max_classes]
    fig, axes = plt.subplots(len(shown), per_class, figsize=(per_class * 1.1, len(shown) * 1.15), squeeze=False)
    for row, name in enumerate(shown):
        picks = np.flatnonzero(labels == row)[:per_class]
        for col in range(per_class):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(picks):
                ax.imshow(images[picks[col]], interpolation="nearest")
        axes[row, 0].text(-4, 16, name, ha="right", va="center", fontsize=9)
    extra = f" (first {max_classes} of {len(class_names)} classes)" if len(class_names) > max_classes else ""
    fig.suptitle("Training images per class" + extra)
    _save(fig, path)


def augmentation_preview(original: np.ndarray, copies: list[np.ndarray], path: Path) -> None:
    """Each column: a training image, then its cached augmented copies below it."""
    rows = [original, *copies]
    fig, axes = plt.subplots(len(rows), len(original), figsize=(len(original) * 1.2, len(rows) * 1.25),
                             squeeze=False)
    for r, batch in enumerate(rows):
        for c, image in enumerate(batch):
            axes[r, c].imshow(image, interpolation="nearest")
            axes[r, c].axis("off")
        axes[r, 0].set_title("original" if r == 0 else f"copy {r}", fontsize=8, loc="left")
    fig.suptitle("Cached augmentations (online flip/shift come on top during training)")
    _save(fig, path)


def learning_curves(history: dict, title: str, path: Path, x_label: str = "epoch") -> None:
    """Train vs validation accuracy and loss per epoch (or per `x_label`, e.g. trees of a forest);
    training alone when nothing was validated (the scratch CNN trained on train+val)."""
    epochs = np.arange(1, len(history["loss"]) + 1)
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in ((acc_ax, "accuracy"), (loss_ax, "loss")):
        ax.plot(epochs, history[key], marker="o", label="train")
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], marker="o", label="validation")
        ax.set_xlabel(x_label)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    _save(fig, path)


def confusion_heatmap(matrix: np.ndarray, class_names: list[str], title: str, path: Path,
                      groups: list[str] | None = None) -> None:
    """Row-normalised confusion matrix (recall per true class; the rates written in each cell
    for small class sets), drawn by scikit-learn's ConfusionMatrixDisplay.

    `groups` (the superclass of each class, in matrix order) draws a box around
    each run of equal groups and names it, so within-superclass errors stand out.
    """
    n = len(class_names)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(6.0, n * 0.12 + 4)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    label_size = 8 if n <= 20 else 4
    display = ConfusionMatrixDisplay(rates, display_labels=class_names)
    display.plot(ax=ax, cmap="Blues", include_values=n <= 20, values_format=".2f", xticks_rotation="vertical",
                 colorbar=False, im_kw={"vmin": 0, "vmax": 1},
                 text_kw={"fontsize": 7})
    fig.colorbar(display.im_, ax=ax, fraction=0.046, label="fraction of the true class")
    ax.tick_params(labelsize=label_size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if groups:
        starts = [k for k in range(n) if k == 0 or groups[k] != groups[k - 1]]
        for start, end in zip(starts, starts[1:] + [n]):
            ax.add_patch(plt.Rectangle((start - 0.5, start - 0.5), end - start, end - start,
                                       fill=False, edgecolor="darkorange", linewidth=0.8))
            ax.text(n, (start + end - 1) / 2, f" {groups[start]}", va="center", fontsize=label_size,
                    color="darkorange")
    ax.set_title(title)
    _save(fig, path)
