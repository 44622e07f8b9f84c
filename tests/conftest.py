"""Shared fixtures: tiny synthetic archives in the official CIFAR formats."""
from __future__ import annotations

import os

import pytest

# Before TensorFlow is imported by any test module: quiet logs, oneDNN on.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as the stages and cifar-predict set it

from synthetic import cifar10_members, cifar100_members, write_tar_gz  # noqa: E402


@pytest.fixture(scope="session")
def cifar10_archive(tmp_path_factory):
    """(path, md5) of a CIFAR-10-format archive with 6 train images per class per batch."""
    path = tmp_path_factory.mktemp("archives") / "cifar-10-python.tar.gz"
    return path, write_tar_gz(path, cifar10_members())


@pytest.fixture(scope="session")
def cifar100_archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("archives") / "cifar-100-python.tar.gz"
    return path, write_tar_gz(path, cifar100_members())


@pytest.fixture(scope="session")
def training_data(cifar10_archive, tmp_path_factory):
    """A directory with `prepared/` (20% validation) and un-augmented `records/` (4 shards) of the
    CIFAR-10 archive: the inputs of the train stage."""
    from cifar_pipeline.augment import build_records
    from cifar_pipeline.prepare import prepare

    root = tmp_path_factory.mktemp("training_data")
    prepare(cifar10_archive[0], root / "prepared", "cifar10", "fine", val_fraction=0.2, limit=None, seed=0)
    build_records(root / "prepared", root / "records", copies=0, flip=False, shift=0, rotation_deg=0, zoom=0,
                  shards=4, seed=0)
    return root
