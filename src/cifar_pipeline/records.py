"""TFRecord shards of uint8 images: the format, and the `tf.data` pipelines over it.

Each record is an `Example` with the raw 32x32x3 uint8 bytes and an int label:
raw bytes decode far faster than PNG/JPEG, so reading never limits training.
Flip, shift and cutout are applied online per batch (cheap, vectorised, fresh every
epoch); the costlier rotation and zoom are cached by the augment stage.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import tensorflow as tf

from cifar_pipeline.errors import PipelineError
from cifar_pipeline.params import FIT_ON, FLIP_MODES

IMAGE_SHAPE = (32, 32, 3)
_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
}


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def write_shards(directory: Path, split: str, images: np.ndarray, labels: np.ndarray, shards: int) -> None:
    """Write records round-robin into `shards` files, in the given order."""
    writers = [tf.io.TFRecordWriter(str(Path(directory) / shard_name(split, i, shards))) for i in range(shards)]
    try:
        for i, (image, label) in enumerate(zip(images, labels)):
            example = tf.train.Example(features=tf.train.Features(feature={
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
            }))
            # deterministic=True orders the feature map, so equal data gives equal bytes.
            writers[i % shards].write(example.SerializeToString(deterministic=True))
    finally:
        for writer in writers:
            writer.close()


def read_info(directory: Path) -> dict:
    return json.loads((Path(directory) / "info.json").read_text())


def shard_paths(directory: Path, split: str) -> list[str]:
    paths = sorted(str(p) for p in Path(directory).glob(f"{split}-*-of-*.tfrecord"))
    if not paths:
        raise FileNotFoundError(f"no {split} shards in {directory}; run the augment stage first")
    return paths


def _parse_batch(serialized, num_classes: int):
    parsed = tf.io.parse_example(serialized, _FEATURES)
    images = tf.reshape(tf.io.decode_raw(parsed["image"], tf.uint8), (-1, *IMAGE_SHAPE))
    return images, tf.one_hot(parsed["label"], num_classes)


def random_flip_shift(images, seed, flip: bool, shift_px: int, cutout_px: int = 0, fill=(0, 0, 0)):
    """Flip half the images left-right, translate each by up to `shift_px` pixels,
    and paint a `cutout_px` square at a random centre with `fill` (per channel).

    Shifts pad by reflection and crop at a random offset per image. The cutout
    square may hang over the border, so edges are masked less often than the
    middle, as in Cutout (DeVries & Taylor, 2017); filling with the mean pixel
    makes the hole zero after normalisation. `seed` is a stateless seed pair, so
    a given step always sees the same augmentation.
    """
    batch = tf.shape(images)[0]
    height, width = IMAGE_SHAPE[:2]
    if flip:
        images = _flip_where(tf.random.stateless_uniform([batch], seed=seed) < 0.5, images)
    if shift_px:
        padded = tf.pad(images, [[0, 0], [shift_px, shift_px], [shift_px, shift_px], [0, 0]], mode="REFLECT")
        offsets = tf.random.stateless_uniform([batch, 2], seed=seed + 1, maxval=2 * shift_px + 1, dtype=tf.int32)
        rows = offsets[:, :1] + tf.range(height)[None]
        cols = offsets[:, 1:] + tf.range(width)[None]
        images = tf.gather(padded, rows, axis=1, batch_dims=1)
        images = tf.gather(images, cols, axis=2, batch_dims=1)
    if cutout_px:
        centres = tf.random.stateless_uniform([batch, 2], seed=seed + 2, maxval=height, dtype=tf.int32)
        rows = tf.range(height)[None] - (centres[:, :1] - cutout_px // 2)
        cols = tf.range(width)[None] - (centres[:, 1:] - cutout_px // 2)
        in_rows = (rows >= 0) & (rows < cutout_px)
        in_cols = (cols >= 0) & (cols < cutout_px)
        hole = in_rows[:, :, None, None] & in_cols[:, None, :, None]
        images = tf.where(hole, tf.constant(np.round(fill), images.dtype), images)
    return images


def _flip_where(mask, images):
    """Mirror left-right the images whose entry in the boolean `mask` is true."""
    return tf.where(mask[:, None, None, None], tf.reverse(images, axis=[2]), images)


def _all_records(paths: list[str], most: int) -> tf.Tensor:
    """Every serialized record in the shard files `paths`, in order, as one string tensor:
    about 3 KB an image, so even several cached copies fit in memory. `most` bounds the count."""
    return tf.data.TFRecordDataset(paths).batch(most).get_single_element()


def worker_shards(paths: list[str], worker: int, workers: int) -> list[str]:
    """A worker's share of a split's shards (their paths, or their sizes): every `workers`-th,
    from its index, so each worker reads whole files of its own."""
    mine = paths[worker::workers]
    if not mine:
        raise PipelineError(f"{len(paths)} shard files cannot feed {workers} workers: "
                            "set augment.shards to at least the number of workers")
    return mine


def shard_sizes(directory: Path, split: str) -> list[int]:
    """Records per shard file of a split, in shard_paths order (write_shards deals them round-robin)."""
    count, shards = read_info(directory)["sizes"][split], len(shard_paths(directory, split))
    return [count // shards + (i < count % shards) for i in range(shards)]


def fit_shard_sizes(directory: Path, splits: tuple[str, ...]) -> list[int]:
    """Records per shard file of every split in `splits`, in training_dataset's order."""
    return [size for split in splits for size in shard_sizes(directory, split)]


def fit_splits(fit_on: str) -> tuple[str, ...]:
    """The record splits that a `fit_on` setting (FIT_ON) names, in training_dataset's order."""
    if fit_on not in FIT_ON:
        raise ValueError(f"unknown fit_on {fit_on!r}; allowed: {', '.join(FIT_ON)}")
    return tuple(fit_on.split("+"))


def training_dataset(directory: Path, batch_size: int, num_classes: int, seed: int,
                     online_flip: str, online_shift_px: int, online_cutout_px: int = 0,
                     cutout_fill=(0, 0, 0), start_epoch: int = 0, worker: int = 0, workers: int = 1,
                     batches_per_epoch: int | None = None, splits: tuple[str, ...] = ("train",)) -> tf.data.Dataset:
    """Endless batches of (uint8 images, one-hot labels), epoch after epoch from `start_epoch`,
    `batches_per_epoch` of them an epoch (default: as many as the records fill; the rest sit out).

    `online_flip` (FLIP_MODES): "random" flips each image with probability 1/2, afresh
    every epoch; "alternating" flips a random half of the records in epoch 0, then
    switches every record's orientation each epoch, so any two consecutive epochs show
    each image both ways (airbench's alternating flip: random flips repeat the previous
    epoch's view half the time, which wastes epochs).

    Epoch e is a function of (seed, e) alone: its order is a stateless shuffle and
    each batch's augmentation is seeded by its number. Training resumed at epoch e
    therefore sees exactly the batches an uninterrupted run would have. Of `workers`
    input pipelines (one per machine), this one, `worker`, reads only its share of
    the shard files (worker_shards). `splits` are read as one set: ("train", "val") trains
    on the validation images too (their shards hold no cached copies).
    """
    if online_flip not in FLIP_MODES:
        raise ValueError(f"unknown flip mode {online_flip!r}; allowed: {', '.join(FLIP_MODES)}")
    paths = worker_shards([path for split in splits for path in shard_paths(directory, split)], worker, workers)
    serialized = _all_records(paths, sum(read_info(directory)["sizes"][split] for split in splits))
    count = int(serialized.shape[0])
    steps = batches_per_epoch or count // batch_size
    if steps * batch_size > count:
        raise ValueError(f"{steps} batches of {batch_size} need {steps * batch_size} records; "
                         f"worker {worker} has {count}")
    if online_flip == "alternating":
        # (seed, -2**62): apart from the shuffle's and the augmentation's seeds.
        flipped_first = tf.random.stateless_uniform([count], seed=tf.constant([seed, -2**62], tf.int64)) < 0.5

    def epoch_batches(epoch):
        # (seed, -1 - epoch): apart from the augmentation's (seed, step) seeds.
        order = tf.random.experimental.stateless_shuffle(
            tf.range(count, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), -1 - epoch]))
        batches = tf.reshape(order[: steps * batch_size], (steps, batch_size))
        first_step = epoch * steps
        return tf.data.Dataset.from_tensor_slices((first_step + tf.range(steps, dtype=tf.int64), batches))

    def load(step, indices):
        images, labels = _parse_batch(tf.gather(serialized, indices), num_classes)
        if online_flip == "alternating":
            odd_epoch = (step // steps) % 2 == 1
            images = _flip_where(tf.gather(flipped_first, indices) != odd_epoch, images)
        # Other workers' batches of the same number get other augmentations.
        step_seed = tf.stack([tf.constant(seed, tf.int64), step * workers + worker])
        return random_flip_shift(images, step_seed, online_flip == "random", online_shift_px,
                                 online_cutout_px, cutout_fill), labels

    return (tf.data.Dataset.range(start_epoch, 2**62)
            .flat_map(epoch_batches)
            .map(load, num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))


def eval_dataset(directory: Path, split: str, batch_size: int, num_classes: int) -> tf.data.Dataset:
    """Un-augmented, ordered batches of a split (val or test)."""
    batches = math.ceil(read_info(directory)["sizes"][split] / batch_size)
    return (tf.data.TFRecordDataset(shard_paths(directory, split))
            .batch(batch_size)
            # A known length gives Keras a progress total and spares it a warning when the data ends.
            .apply(tf.data.experimental.assert_cardinality(batches))
            .map(lambda s: _parse_batch(s, num_classes), num_parallel_calls=tf.data.AUTOTUNE)
            .cache()
            .prefetch(tf.data.AUTOTUNE))
