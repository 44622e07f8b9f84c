"""Cached augmentation and TFRecords: round trip, determinism, online flip/shift."""
import hashlib

import numpy as np
import pytest
import tensorflow as tf

from cifar_pipeline import records
from cifar_pipeline.errors import PipelineError
from cifar_pipeline.augment import build_records
from cifar_pipeline.prepare import load_split, prepare


@pytest.fixture(scope="module")
def prepared(cifar10_archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "prepared"
    prepare(cifar10_archive[0], out, "cifar10", "fine", val_fraction=0.1, limit=None, seed=0)
    return out


def _build(prepared, out, seed=0, copies=2):
    return build_records(prepared, out, copies=copies, flip=True, shift=0.1, rotation_deg=15, zoom=0.1,
                         shards=3, seed=seed)


def _digests(directory):
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_shards_hold_originals_plus_copies_and_plain_val_test(prepared, tmp_path):
    preview = _build(prepared, tmp_path / "rec")
    info = records.read_info(tmp_path / "rec")
    assert info["sizes"] == {"train": 270 * 3, "val": 30, "test": 30} and info["num_classes"] == 10
    assert len(records.shard_paths(tmp_path / "rec", "train")) == 3
    assert len(preview["copies"]) == 2 and not np.array_equal(preview["copies"][0], preview["original"])
    val = load_split(prepared, "val")
    images, labels = zip(*records.eval_dataset(tmp_path / "rec", "val", 7, 10))
    images, labels = np.concatenate(images), np.concatenate(labels)
    # Round-robin sharding reorders records; every val image comes back unchanged with its label.
    order = sorted(range(len(val.labels)), key=lambda i: val.images[i].tobytes())
    got = sorted(range(len(images)), key=lambda i: images[i].tobytes())
    np.testing.assert_array_equal(images[got], val.images[order])
    np.testing.assert_array_equal(labels[got].argmax(1), val.labels[order])


def test_same_seed_same_bytes_other_seed_other_bytes(prepared, tmp_path):
    _build(prepared, tmp_path / "a")
    _build(prepared, tmp_path / "b")
    _build(prepared, tmp_path / "c", seed=1)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert _digests(tmp_path / "a")["train-00000-of-00003.tfrecord"] != \
        _digests(tmp_path / "c")["train-00000-of-00003.tfrecord"]


def test_training_batches_are_endless_one_hot_uint8(prepared, tmp_path):
    _build(prepared, tmp_path / "rec", copies=0)
    data = records.training_dataset(tmp_path / "rec", 64, 10, seed=0, online_flip="random", online_shift_px=2)
    batches = list(data.take(10))  # 270 records, 4 batches an epoch: must keep going
    images, labels = batches[-1]
    assert images.dtype == tf.uint8 and images.shape == (64, 32, 32, 3)
    assert labels.shape == (64, 10) and np.allclose(labels.numpy().sum(1), 1)


def test_each_epoch_holds_every_record_once_and_can_be_started_alone(prepared, tmp_path):
    _build(prepared, tmp_path / "rec", copies=0)
    args = dict(batch_size=64, num_classes=10, seed=3, online_flip="alternating", online_shift_px=2,
                online_cutout_px=4)
    steps = 270 // 64
    from_start = [(x.numpy(), y.numpy()) for x, y in
                  records.training_dataset(tmp_path / "rec", **args).take(3 * steps)]
    # Resuming at epoch 2 yields exactly the batches, augmentation included, of an uninterrupted stream.
    resumed = [(x.numpy(), y.numpy()) for x, y in
               records.training_dataset(tmp_path / "rec", start_epoch=2, **args).take(steps)]
    for (x, y), (x_resumed, y_resumed) in zip(from_start[2 * steps:], resumed):
        np.testing.assert_array_equal(x, x_resumed)
        np.testing.assert_array_equal(y, y_resumed)
    # Un-augmented, an epoch is 4 full batches of distinct records; the next epoch is another order.
    plain = dict(args, online_flip="none", online_shift_px=0, online_cutout_px=0)
    epochs = [np.concatenate([x.numpy() for x, _ in records.training_dataset(
        tmp_path / "rec", start_epoch=epoch, **plain).take(steps)]) for epoch in (0, 1)]
    train = load_split(prepared, "train").images
    for images in epochs:
        assert len({image.tobytes() for image in images}) == steps * 64
        assert {image.tobytes() for image in images} <= {image.tobytes() for image in train}
    assert not np.array_equal(epochs[0], epochs[1])


def test_fit_on_train_and_val_reads_both_splits_each_image_once_an_epoch(prepared, tmp_path):
    _build(prepared, tmp_path / "rec", copies=0)
    splits = records.fit_splits("train+val")
    count = sum(records.read_info(tmp_path / "rec")["sizes"][split] for split in splits)
    data = records.training_dataset(tmp_path / "rec", count, 10, seed=0, online_flip="none", online_shift_px=0,
                                    splits=splits)
    images, labels = next(iter(data))
    expected = [load_split(prepared, split) for split in ("train", "val")]
    assert sorted(image.tobytes() for image in images.numpy()) == sorted(
        image.tobytes() for split in expected for image in split.images)
    np.testing.assert_array_equal(np.bincount(labels.numpy().argmax(1), minlength=10),
                                  np.bincount(np.concatenate([split.labels for split in expected]), minlength=10))
    assert records.fit_splits("train") == ("train",)
    with pytest.raises(ValueError, match="unknown fit_on"):
        records.fit_splits("val")


def test_alternating_flip_shows_each_image_both_ways_in_any_two_consecutive_epochs(prepared, tmp_path):
    _build(prepared, tmp_path / "rec", copies=0)
    plain = dict(batch_size=90, num_classes=10, seed=1, online_shift_px=0)  # 270 records: 3 batches an epoch
    original = {image.tobytes() for image in load_split(prepared, "train").images}

    def mirrored_per_epoch(flip):
        data = records.training_dataset(tmp_path / "rec", online_flip=flip, **plain)
        epochs = np.concatenate([x.numpy() for x, _ in data.take(4 * 3)]).reshape(4, 270, 32, 32, 3)
        # Each record as its unflipped bytes, with whether this epoch showed it mirrored.
        return [{(image if image.tobytes() in original else image[:, ::-1]).tobytes(): image.tobytes() not in original
                 for image in epoch} for epoch in epochs]

    views = mirrored_per_epoch("alternating")
    assert all(len(epoch) == 270 for epoch in views)
    assert 90 < sum(views[0].values()) < 180  # a random half starts mirrored
    for before, after in zip(views, views[1:]):
        assert all(after[image] != mirrored for image, mirrored in before.items())
    # Random flips repeat the previous epoch's view for about half the images.
    views = mirrored_per_epoch("random")
    assert 90 < sum(views[1][image] == mirrored for image, mirrored in views[0].items()) < 180


def test_online_flip_and_shift():
    images = tf.constant(np.arange(2 * 32 * 32 * 3).reshape(2, 32, 32, 3) % 251, tf.uint8)
    seed = tf.constant([0, 0], tf.int64)
    same = records.random_flip_shift(images, seed, flip=False, shift_px=0)
    np.testing.assert_array_equal(same, images)
    flipped = records.random_flip_shift(images, seed, flip=True, shift_px=0).numpy()
    for got, original in zip(flipped, images.numpy()):
        assert np.array_equal(got, original) or np.array_equal(got, original[:, ::-1])
    shifted = records.random_flip_shift(images, seed, flip=False, shift_px=3).numpy()
    # Every shifted image is the original moved by at most 3 pixels: its centre survives somewhere.
    for got, original in zip(shifted, images.numpy()):
        centre = original[3:29, 3:29]
        assert any(np.array_equal(got[dy:dy + 26, dx:dx + 26], centre) for dy in range(7) for dx in range(7))
    np.testing.assert_array_equal(records.random_flip_shift(images, seed, True, 3),
                                  records.random_flip_shift(images, seed, True, 3))


def test_online_cutout_paints_one_clipped_square_with_the_fill():
    images = tf.fill((64, 32, 32, 3), tf.constant(200, tf.uint8))
    fill = (125.2, 122.9, 113.8)
    out = records.random_flip_shift(images, tf.constant([1, 2], tf.int64), flip=False, shift_px=0,
                                    cutout_px=8, fill=fill).numpy()
    holes = np.all(out == np.array([125, 123, 114], np.uint8), axis=-1)
    assert np.all(holes | np.all(out == 200, axis=-1))  # every pixel is either untouched or filled
    sizes = []
    for hole in holes:
        rows, cols = np.nonzero(hole.any(1))[0], np.nonzero(hole.any(0))[0]
        assert rows.size and hole[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()  # one solid rectangle
        assert rows.size <= 8 and cols.size <= 8
        sizes.append(hole.sum())
    # Squares near the border are clipped; most land whole.
    assert max(sizes) == 64 and min(sizes) < 64


def test_workers_read_disjoint_shard_files_that_together_hold_every_record(prepared, tmp_path):
    _build(prepared, tmp_path / "rec", copies=0)  # 270 records in 3 shards of 90
    plain = dict(batch_size=10, num_classes=10, seed=0, online_flip="none", online_shift_px=0)
    assert records.shard_sizes(tmp_path / "rec", "train") == [90, 90, 90]
    seen = []
    for worker, files in ((0, 2), (1, 1)):  # worker 0 reads shards 0 and 2, worker 1 shard 1
        images = np.concatenate([x.numpy() for x, _ in records.training_dataset(
            tmp_path / "rec", worker=worker, workers=2, batches_per_epoch=9 * files, **plain).take(9 * files)])
        seen.append({image.tobytes() for image in images})
        assert len(seen[-1]) == 90 * files
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {image.tobytes() for image in load_split(prepared, "train").images}
    with pytest.raises(PipelineError, match="3 shard files cannot feed 4 workers: set augment.shards"):
        records.training_dataset(tmp_path / "rec", worker=3, workers=4, **plain)
