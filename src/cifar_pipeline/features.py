"""Run a frozen backbone over every split once and cache the pooled features; the
transfer model is that backbone with a head trained on them.

Images are resized inside the model one batch at a time, so the 60,000 images
never sit in memory at the backbone's input size; only the small feature
vectors are kept.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cifar_pipeline import atomic
from cifar_pipeline.backbones import build_feature_extractor
from cifar_pipeline.keras_save import save_model
from cifar_pipeline.prepare import SPLITS, load_split

log = logging.getLogger(__name__)


# The features of the training images' mirror images, when transfer.mirrored_train asks for them.
MIRRORED_TRAIN = "train_mirrored"
# The test images' mirror images: with `test.npy`, the views of flip test-time augmentation,
# so evaluating a new head needs no backbone pass (evaluate.cached_feature_probs).
MIRRORED_TEST = "test_mirrored"
TRANSFER_MODEL = "transfer"


def weights_digest(model) -> str:
    """A hash of a model's weights: whether a transfer model's extractor is exactly the one
    that computed the cached features (fine-tuning changes it)."""
    digest = hashlib.sha256()
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    return digest.hexdigest()


def extract(extractor, images: np.ndarray, batch_size: int) -> np.ndarray:
    data = tf.data.Dataset.from_tensor_slices(images).batch(batch_size).prefetch(tf.data.AUTOTUNE)
    return extractor.predict(data, verbose=2).astype(np.float32)


def extract_features(*, prepared_dir: Path, features_dir: Path, extractor_path: Path,
                     backbone: str, image_size: int, weights: str, mid_level_features: bool,
                     mirrored_train: bool, batch_size: int) -> dict:
    """Write `{split}.npy` and `test_mirrored.npy` features (and `train_mirrored.npy` with
    `mirrored_train`) and the extractor model; return throughput per array.

    Timings are printed and returned, never written into the features directory:
    equal features must be equal bytes, or DVC would re-run everything downstream.
    """
    extractor = build_feature_extractor(backbone, image_size, weights, mid_level_features)
    jobs = [(split, split, False) for split in SPLITS] + [(MIRRORED_TEST, "test", True)]
    jobs += [(MIRRORED_TRAIN, "train", True)] if mirrored_train else []
    arrays, stats = {}, {}
    for name, split, mirrored in jobs:
        images = load_split(prepared_dir, split, mmap=True).images
        if mirrored:  # a left-right view; the dataset copies it (a tf.data map to flip was 20% slower)
            images = images[:, :, ::-1]
        start = time.perf_counter()
        arrays[name] = extract(extractor, images, batch_size)
        seconds = time.perf_counter() - start
        stats[name] = {"images": len(images), "seconds": round(seconds, 1),
                       "images_per_s": round(len(images) / seconds, 1)}
        log.info(f"features: {name}: {len(images)} images in {seconds:.1f}s "
              f"({len(images) / seconds:.0f} images/s), shape {arrays[name].shape}")
    atomic.save_arrays(features_dir, arrays, {"backbone": backbone, "image_size": image_size, "weights": weights,
                                              "mid_level_features": mid_level_features,
                                              "mirrored_train": mirrored_train,
                                              "extractor_weights": weights_digest(extractor)})
    save_model(extractor, extractor_path)
    return stats


def transfer_model(extractor: keras.Model, head: keras.Model) -> keras.Model:
    """One model from images to probabilities: the feature extractor, then the head."""
    inputs = keras.Input((32, 32, 3), dtype="uint8", name="image")
    return keras.Model(inputs, head(extractor(inputs)), name=TRANSFER_MODEL)


def extractor_and_head(model: keras.Model) -> tuple[keras.Model, keras.Model] | None:
    """The two parts of a model made by transfer_model; None for any other model."""
    parts = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return (parts[0], parts[1]) if model.name == TRANSFER_MODEL and len(parts) == 2 else None
