"""Tiny CIFAR-format archives for tests, written the way the official ones are.

The official batches are Python 2 pickles (protocol 2) whose strings are
Python 2 `str` and whose `data` is a numpy uint8 array rebuilt through
`numpy.core.multiarray._reconstruct`. Python 3 cannot produce that directly
(it would pickle bytes via `_codecs.encode`), so this module emits the opcodes.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np


def _py2_str(value: str | bytes) -> bytes:
    raw = value.encode("latin1") if isinstance(value, str) else value
    if len(raw) < 256:
        return pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw
    return pickle.BINSTRING + struct.pack("<i", len(raw)) + raw


def _int(value: int) -> bytes:
    return pickle.BININT + struct.pack("<i", value)


def _seq(items: list[bytes], empty: bytes, mark_end: bytes) -> bytes:
    return empty + pickle.MARK + b"".join(items) + mark_end


def _tuple(items: list[bytes]) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _uint8_array(array: np.ndarray) -> bytes:
    dtype = (_global("numpy", "dtype") + _tuple([_py2_str("u1"), _int(0), _int(1)]) + pickle.REDUCE
             + _tuple([_int(3), _py2_str("|"), pickle.NONE, pickle.NONE, pickle.NONE, _int(-1), _int(-1),
                       _int(0)]) + pickle.BUILD)
    shape = _tuple([_int(d) for d in array.shape])
    state = _tuple([_int(1), shape, dtype, pickle.NEWFALSE, _py2_str(np.ascontiguousarray(array).tobytes())])
    return (_global("numpy.core.multiarray", "_reconstruct")
            + _tuple([_global("numpy", "ndarray"), _tuple([_int(0)]), _py2_str("b")]) + pickle.REDUCE
            + state + pickle.BUILD)


def _value(value) -> bytes:
    if isinstance(value, np.ndarray):
        return _uint8_array(value)
    if isinstance(value, (str, bytes)):
        return _py2_str(value)
    if isinstance(value, int):
        return _int(value)
    if isinstance(value, list):
        return _seq([_value(v) for v in value], pickle.EMPTY_LIST, pickle.APPENDS)
    raise TypeError(type(value))


def py2_pickle(mapping: dict) -> bytes:
    """A protocol-2 pickle of a dict, as Python 2 would have written it."""
    items = [_py2_str(k) + _value(v) for k, v in mapping.items()]
    return pickle.PROTO + b"\x02" + _seq(items, pickle.EMPTY_DICT, pickle.SETITEMS) + pickle.STOP


def random_images(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """(N, 3072) uint8 rows, channels first; each class gets its own mean colour so models can learn."""
    base = rng.integers(0, 256, size=(labels.max() + 1, 3, 1, 1))
    noise = rng.normal(0, 40, size=(len(labels), 3, 32, 32))
    images = np.clip(base[labels] + noise, 0, 255).astype(np.uint8)
    return images.reshape(len(labels), -1)


def write_tar_gz(path: Path, members: dict[str, bytes]) -> str:
    """Write members into a .tar.gz; return its md5."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def cifar10_members(per_class_train: int = 6, per_class_test: int = 3, seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    classes = [f"class{i}" for i in range(10)]
    members = {"cifar-10-batches-py/batches.meta": py2_pickle(
        {"num_cases_per_batch": 10 * per_class_train, "label_names": classes, "num_vis": 3072})}
    for i in range(1, 6):
        labels = rng.permutation(np.repeat(np.arange(10), per_class_train))
        members[f"cifar-10-batches-py/data_batch_{i}"] = py2_pickle({
            "batch_label": f"training batch {i} of 5", "labels": labels.tolist(),
            "data": random_images(rng, labels), "filenames": [f"img{j}.png" for j in range(len(labels))]})
    labels = rng.permutation(np.repeat(np.arange(10), per_class_test))
    members["cifar-10-batches-py/test_batch"] = py2_pickle({
        "batch_label": "testing batch 1 of 1", "labels": labels.tolist(), "data": random_images(rng, labels),
        "filenames": [f"t{j}.png" for j in range(len(labels))]})
    return members


def cifar100_members(per_class_train: int = 4, per_class_test: int = 2, seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    fine = [f"fine{i}" for i in range(100)]
    coarse = [f"coarse{i}" for i in range(20)]
    members = {"cifar-100-python/meta": py2_pickle({"fine_label_names": fine, "coarse_label_names": coarse})}
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = rng.permutation(np.repeat(np.arange(100), per_class))
        members[f"cifar-100-python/{split}"] = py2_pickle({
            "batch_label": f"{split} batch", "fine_labels": labels.tolist(),
            # Not contiguous, like the real mapping (fine classes are alphabetical).
            "coarse_labels": (labels % 20).tolist(), "data": random_images(rng, labels),
            "filenames": [f"{split}{j}.png" for j in range(len(labels))]})
    return members
