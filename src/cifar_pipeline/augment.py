"""Cache augmented copies of the training split as sharded TFRecords.

Rotation and zoom need an interpolating affine warp per image, the costliest
augmentations, so they are done once here (seeded, so the same params give the
same bytes) rather than every epoch. Output directory: train shards (originals
plus `copies` augmented copies, shuffled), un-augmented val and test shards,
and `info.json` with the split sizes.
"""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from cifar_pipeline import atomic, records
from cifar_pipeline.prepare import load_meta, load_split

CHUNK = 1000  # images per augmentation call: large enough to amortise overhead, small in memory


def build_augmenter(flip: bool, shift: float, rotation_deg: float, zoom: float, seed: int) -> keras.Sequential:
    """The cached augmentations as Keras preprocessing layers, each with its own seed."""
    layers = []
    if flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if shift:
        layers.append(keras.layers.RandomTranslation(shift, shift, fill_mode="reflect", seed=seed + 1))
    if rotation_deg:
        layers.append(keras.layers.RandomRotation(rotation_deg / 360.0, fill_mode="reflect", seed=seed + 2))
    if zoom:
        layers.append(keras.layers.RandomZoom(zoom, zoom, fill_mode="reflect", seed=seed + 3))
    return keras.Sequential(layers, name="cached_augmentations")


def augment_images(images: np.ndarray, augmenter: keras.Sequential) -> np.ndarray:
    """Augmented uint8 copies of `images`, computed in chunks."""
    if not augmenter.layers:
        return images.copy()
    out = np.empty_like(images)
    for start in range(0, len(images), CHUNK):
        batch = images[start:start + CHUNK].astype("float32")
        augmented = keras.ops.convert_to_numpy(augmenter(batch, training=True))
        out[start:start + CHUNK] = np.clip(np.rint(augmented), 0, 255).astype(np.uint8)
    return out


def build_records(prepared_dir: Path, out_dir: Path, copies: int, flip: bool, shift: float,
                  rotation_deg: float, zoom: float, shards: int, seed: int) -> dict:
    """Write the shards; return previews {"original": (k,...), "copies": [(k,...), ...]} of the first images."""
    train = load_split(prepared_dir, "train")
    augmenter = build_augmenter(flip, shift, rotation_deg, zoom, seed)
    augmented = [augment_images(train.images, augmenter) for _ in range(copies)]
    images = np.concatenate([train.images, *augmented])
    labels = np.tile(train.labels, copies + 1)
    order = np.random.default_rng(seed).permutation(len(labels))
    info = {"sizes": {"train": len(labels)}, "copies": copies,
            "num_classes": len(load_meta(prepared_dir)["class_names"])}
    with atomic.atomic_path(out_dir) as tmp:
        tmp.mkdir()
        records.write_shards(tmp, "train", images[order], labels[order], shards)
        for split in ("val", "test"):
            data = load_split(prepared_dir, split)
            records.write_shards(tmp, split, data.images, data.labels, shards)
            info["sizes"][split] = len(data.labels)
        atomic.write_json(tmp / "info.json", info)
    preview = 8
    return {"original": train.images[:preview], "copies": [a[:preview] for a in augmented]}
