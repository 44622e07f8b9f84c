"""The prepare step: stratified seeded split, train-only statistics, identical bytes on rerun."""
import hashlib
import json

import numpy as np
import pytest

from cifar_pipeline.errors import PipelineError
from cifar_pipeline.prepare import channel_stats, load_meta, load_split, prepare


def _digest(directory):
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_split_is_stratified_and_stats_come_from_train_only(cifar10_archive, tmp_path):
    path, _ = cifar10_archive
    meta = prepare(path, tmp_path / "prep", "cifar10", "fine", val_fraction=0.2, limit=None, seed=0)
    assert meta["sizes"] == {"train": 240, "val": 60, "test": 30}
    train, val = load_split(tmp_path / "prep", "train"), load_split(tmp_path / "prep", "val")
    assert np.bincount(val.labels).tolist() == [6] * 10
    assert np.bincount(train.labels).tolist() == [24] * 10
    mean, std = channel_stats(train.images)
    assert meta["mean"] == mean and meta["std"] == std
    assert meta["mean"] != channel_stats(np.concatenate([train.images, val.images]))[0]
    assert load_meta(tmp_path / "prep")["class_names"][0] == "class0"


def test_same_inputs_give_identical_bytes_and_seed_changes_the_split(cifar10_archive, tmp_path):
    path, _ = cifar10_archive
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        prepare(path, tmp_path / name, "cifar10", "fine", val_fraction=0.1, limit=None, seed=seed)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a")["val_labels.npy"] != _digest(tmp_path / "c")["val_labels.npy"]


def test_limit_caps_training_images_keeping_classes(cifar10_archive, tmp_path):
    path, _ = cifar10_archive
    meta = prepare(path, tmp_path / "p", "cifar10", "fine", val_fraction=0.1, limit=100, seed=0)
    assert meta["sizes"]["train"] + meta["sizes"]["val"] == 100 and meta["sizes"]["test"] == 30
    assert np.bincount(load_split(tmp_path / "p", "train").labels).tolist() == [9] * 10


def test_cifar100_coarse_meta(cifar100_archive, tmp_path):
    path, _ = cifar100_archive
    meta = prepare(path, tmp_path / "p", "cifar100", "coarse", val_fraction=0.1, limit=None, seed=0)
    assert len(meta["class_names"]) == 20 and meta["label_mode"] == "coarse"
    assert json.loads((tmp_path / "p" / "meta.json").read_text())["dataset"] == "cifar100"


def test_a_split_too_small_for_every_class_says_what_to_change(cifar100_archive, tmp_path):
    path, _ = cifar100_archive
    with pytest.raises(PipelineError, match="raise data.limit or change data.val_fraction"):
        prepare(path, tmp_path / "p", "cifar100", "fine", val_fraction=0.1, limit=None, seed=0)
    assert not (tmp_path / "p").exists()


def test_test_limit_caps_test_images_keeping_classes(cifar10_archive, tmp_path):
    path, _ = cifar10_archive
    meta = prepare(path, tmp_path / "p", "cifar10", "fine", val_fraction=0.1, limit=None, seed=0, test_limit=20)
    assert meta["sizes"] == {"train": 270, "val": 30, "test": 20}
    assert np.bincount(load_split(tmp_path / "p", "test").labels).tolist() == [2] * 10


@pytest.mark.parametrize("key", ["limit", "test_limit"])
def test_a_cap_below_the_class_count_names_its_setting(cifar100_archive, tmp_path, key):
    path, _ = cifar100_archive
    with pytest.raises(PipelineError, match=f"data.{key}=50 cannot keep one image of each of the 100 classes"):
        prepare(path, tmp_path / "p", "cifar100", "fine", val_fraction=0.1, seed=0,
                **{"limit": None, "test_limit": None, key: 50})
    assert not (tmp_path / "p").exists()
