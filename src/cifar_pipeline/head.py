"""Train a classification head on cached backbone features; save an end-to-end model.

The head trains on the feature arrays alone (seconds per experiment); the
saved transfer model chains the frozen extractor and the head, so it takes raw
uint8 images like the scratch model.
"""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from cifar_pipeline import atomic
from cifar_pipeline.backbones import ImageNetPreprocessing  # noqa: F401  registers the layer for loading
from cifar_pipeline.errors import PipelineError
from cifar_pipeline.prepare import load_meta, load_split
from cifar_pipeline.train import fit, make_optimizer


def build_head(kind: str, feature_mean: np.ndarray, feature_var: np.ndarray, num_classes: int,
               units: int, dropout: float) -> keras.Model:
    """`dense`: Dense + BatchNorm + Dropout, as in the common notebooks; `logistic`: a linear probe.

    Features are first standardised with the training features' statistics:
    backbones emit features on arbitrary scales (random-init ones can be orders
    of magnitude below 1), which would otherwise stall a linear probe.
    """
    inputs = keras.Input((len(feature_mean),), name="features")
    x = layers.Normalization(mean=feature_mean, variance=np.maximum(feature_var, 1e-12),
                             name="standardize")(inputs)
    if kind == "dense":
        x = layers.Dense(units, use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
        x = layers.Dropout(dropout)(x)
    elif kind != "logistic":
        raise ValueError(f"unknown head.kind {kind!r}; allowed: dense, logistic")
    x = layers.Dense(num_classes, name="logits")(x)
    outputs = layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"{kind}_head")


def _feature_dataset(features: np.ndarray, labels: np.ndarray, num_classes: int, batch_size: int,
                     shuffle_seed: int | None):
    data = tf.data.Dataset.from_tensor_slices((features, tf.one_hot(labels, num_classes)))
    if shuffle_seed is not None:
        data = data.shuffle(len(labels), seed=shuffle_seed, reshuffle_each_iteration=True)
    return data.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def train_head(*, features_dir: Path, prepared_dir: Path, extractor_path: Path, model_path: Path,
               live_dir: Path, kind: str, units: int, dropout: float, lr: float, weight_decay: float,
               epochs: int, batch_size: int, patience: int, seed: int) -> dict:
    """Fit the head on train features, early-stopped on val; save extractor + head as one model."""
    num_classes = len(load_meta(prepared_dir)["class_names"])
    train_x, val_x = (np.load(Path(features_dir) / f"{s}.npy") for s in ("train", "val"))
    extractor = keras.models.load_model(extractor_path)
    if extractor.output_shape[-1] != train_x.shape[1]:
        raise PipelineError(f"{features_dir} holds {train_x.shape[1]}-dim features but {extractor_path} "
                            f"outputs {extractor.output_shape[-1]}; re-run the extract_features stage")
    train_y, val_y = (load_split(prepared_dir, s, mmap=True).labels for s in ("train", "val"))
    head = build_head(kind, train_x.mean(axis=0), train_x.var(axis=0), num_classes, units, dropout)
    history = fit(
        head,
        _feature_dataset(train_x, train_y, num_classes, batch_size, shuffle_seed=seed),
        _feature_dataset(val_x, val_y, num_classes, batch_size, shuffle_seed=None),
        steps_per_epoch=None, epochs=epochs, optimizer=make_optimizer("adamw", lr, 0.0, weight_decay),
        label_smoothing=0.0, schedule="plateau", patience=patience,
        live_dir=live_dir, images_per_epoch=len(train_y))
    inputs = keras.Input((32, 32, 3), dtype="uint8", name="image")
    model = keras.Model(inputs, head(extractor(inputs)), name="transfer")
    with atomic.atomic_path(model_path) as tmp:
        model.save(tmp)
    return history
