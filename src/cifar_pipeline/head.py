"""Train a classification head on cached backbone features; save an end-to-end model.

The head trains on the feature arrays alone (seconds per experiment); the
saved transfer model chains the frozen extractor and the head, so it takes raw
uint8 images like the scratch model. A random-forest head is fitted by
scikit-learn and then converted to a Keras layer (forest.py) for saving.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from dvclive import Live
from keras import layers
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import log_loss

from cifar_pipeline.errors import PipelineError
from cifar_pipeline.features import MIRRORED_TRAIN, transfer_model
from cifar_pipeline.forest import forest_layer
from cifar_pipeline.keras_save import save_model
from cifar_pipeline.prepare import load_meta, load_split
from cifar_pipeline.saved_models import load_model
from cifar_pipeline.train import fit, learning_rate, make_optimizer


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
        raise ValueError(f"unknown head.kind {kind!r} for a Keras head; allowed: dense, logistic")
    x = layers.Dense(num_classes, name="logits")(x)
    outputs = layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"{kind}_head")


def _feature_dataset(features: np.ndarray, labels: np.ndarray, num_classes: int, batch_size: int,
                     shuffle_seed: int | None):
    data = tf.data.Dataset.from_tensor_slices((features, tf.one_hot(labels, num_classes)))
    if shuffle_seed is not None:
        data = data.shuffle(len(labels), seed=shuffle_seed, reshuffle_each_iteration=True)
    return data.batch(batch_size).prefetch(tf.data.AUTOTUNE)


# Training images scored for the forest's train curve: enough for a smooth curve, cheap to predict.
FOREST_TRAIN_SAMPLE = 5000
# What a head's history holds per epoch (per tree count for a forest), as Keras names it.
HISTORY_KEYS = ("accuracy", "loss", "val_accuracy", "val_loss")


def fit_forest(train_x, train_y, val_x, val_y, num_classes: int, trees: int, min_samples_leaf: int,
               seed: int, live_dir: Path) -> tuple[keras.Model, dict]:
    """A random forest on the features, as a Keras model; its history has one entry per tree
    count (accuracy and log loss of the first k trees), logged to DVCLive like epochs."""
    forest = RandomForestClassifier(n_estimators=trees, min_samples_leaf=min_samples_leaf, n_jobs=-1,
                                    random_state=seed, verbose=1)
    start = time.perf_counter()
    forest.fit(train_x, train_y)
    fit_seconds = time.perf_counter() - start
    if len(forest.classes_) != num_classes:
        raise PipelineError(f"the training features hold {len(forest.classes_)} of {num_classes} classes; "
                            "a forest head needs every class in the training split")
    sample = np.random.default_rng(seed).permutation(len(train_y))[:FOREST_TRAIN_SAMPLE]
    history = {key: [] for key in HISTORY_KEYS}
    live = Live(str(live_dir), report=None, save_dvc_exp=False, dvcyaml=None)
    for prefix, x, y in (("", train_x[sample], train_y[sample]), ("val_", val_x, val_y)):
        # Mean probability of the first k trees, for every k at once.
        running = np.cumsum([tree.predict_proba(x) for tree in forest.estimators_], axis=0)
        for k, total in enumerate(running, start=1):
            probs = np.clip(total / k, 1e-7, 1)  # a tree's leaf can give a class probability 0
            probs /= probs.sum(axis=1, keepdims=True)
            history[f"{prefix}accuracy"].append(float((probs.argmax(axis=1) == y).mean()))
            history[f"{prefix}loss"].append(float(log_loss(y, probs, labels=forest.classes_)))
    for k in range(trees):
        for key, split in (("accuracy", "train"), ("val_accuracy", "eval"), ("loss", "train"), ("val_loss", "eval")):
            live.log_metric(f"{split}/{key.removeprefix('val_')}", round(history[key][k], 4))
        live.next_step()
    live.summary.update(trees=trees, best_val_accuracy=round(history["val_accuracy"][-1], 4),
                        train_time_s=round(fit_seconds, 1))
    live.make_summary()
    inputs = keras.Input((train_x.shape[1],), name="features")
    head = keras.Model(inputs, forest_layer(forest, train_x.shape[1])(inputs), name="random_forest_head")
    return head, history


def train_head(*, features_dir: Path, prepared_dir: Path, extractor_path: Path, model_path: Path,
               live_dir: Path, kind: str, units: int, dropout: float, lr: float, weight_decay: float,
               epochs: int, batch_size: int, patience: int, trees: int, min_samples_leaf: int, seed: int,
               label_smoothing: float, schedule: str) -> dict:
    """Fit the head on train features (Keras heads keep their best val epoch); save extractor + head
    as one model, which the finetune stage then trains end to end."""
    num_classes = len(load_meta(prepared_dir)["class_names"])
    train_x, val_x = (np.load(Path(features_dir) / f"{s}.npy") for s in ("train", "val"))
    extractor = load_model(extractor_path)
    if extractor.output_shape[-1] != train_x.shape[1]:
        raise PipelineError(f"{features_dir} holds {train_x.shape[1]}-dim features but {extractor_path} "
                            f"outputs {extractor.output_shape[-1]}; re-run the extract_features stage")
    train_y, val_y = (load_split(prepared_dir, s, mmap=True).labels for s in ("train", "val"))
    mirrored = Path(features_dir) / f"{MIRRORED_TRAIN}.npy"
    if mirrored.exists():  # each training image twice, as it is and mirrored: flip augmentation, precomputed
        train_x, train_y = np.concatenate([train_x, np.load(mirrored)]), np.concatenate([train_y, train_y])
    if kind == "random_forest":
        head, history = fit_forest(train_x, train_y, val_x, val_y, num_classes, trees, min_samples_leaf, seed,
                                   live_dir)
    else:
        head, history = fit_keras_head(kind, train_x, train_y, val_x, val_y, num_classes, units, dropout, lr,
                                       weight_decay, epochs, batch_size, patience, seed, live_dir, label_smoothing,
                                       schedule)
    save_model(transfer_model(extractor, head), model_path)
    return history


def fit_keras_head(kind, train_x, train_y, val_x, val_y, num_classes, units, dropout, lr, weight_decay, epochs,
                   batch_size, patience, seed, live_dir, label_smoothing, schedule) -> tuple[keras.Model, dict]:
    """A dense or logistic head fitted on the features with AdamW, keeping its best val epoch:
    `plateau` lowers the learning rate and stops early as val stalls; `cosine` decays it to 0
    over exactly `epochs` (fewer epochs for a given accuracy when a quick one is wanted)."""
    head = build_head(kind, train_x.mean(axis=0), train_x.var(axis=0), num_classes, units, dropout)
    steps = math.ceil(len(train_y) / batch_size)  # the last, partial batch included
    history = fit(
        head,
        _feature_dataset(train_x, train_y, num_classes, batch_size, shuffle_seed=seed),
        _feature_dataset(val_x, val_y, num_classes, batch_size, shuffle_seed=None),
        steps_per_epoch=None, epochs=epochs,
        optimizer=make_optimizer("adamw", learning_rate(schedule, lr, epochs, steps, warmup_epochs=0), 0.0,
                                 weight_decay),
        label_smoothing=label_smoothing, schedule=schedule, patience=patience,
        live_dir=live_dir, images_per_epoch=len(train_y))
    return head, history
