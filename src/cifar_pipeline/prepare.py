"""Turn the raw archive into checked, split, uint8 arrays plus their statistics.

Output is one directory: `{train,val,test}_{images,labels}.npy` and
`meta.json` (dataset, class names, per-channel mean/std of the training split,
split sizes). Later stages read only this directory, never the archive.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from cifar_pipeline import atomic
from cifar_pipeline.archive import Split, load_dataset
from cifar_pipeline.errors import PipelineError

SPLITS = ("train", "val", "test")


def stratified_subset(split: Split, size: int, seed: int, param: str) -> Split:
    """`size` images of `split` keeping its class proportions; `param` names the setting
    of `size` for the error when it cannot hold one image of each class."""
    if size >= len(split.labels):
        return split
    num_classes = len(np.unique(split.labels))
    if size < num_classes:
        raise PipelineError(f"{param}={size} cannot keep one image of each of the {num_classes} classes: "
                            f"raise {param} to at least {num_classes}")
    keep, _ = train_test_split(np.arange(len(split.labels)), train_size=size,
                               stratify=split.labels, random_state=seed)
    keep.sort()
    return Split(split.images[keep], split.labels[keep])


def split_validation(split: Split, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """A stratified, seeded (train, val) split."""
    num_classes = len(np.unique(split.labels))
    n_val = round(len(split.labels) * val_fraction)
    if n_val < num_classes or len(split.labels) - n_val < num_classes:
        raise PipelineError(f"cannot split {len(split.labels)} images of {num_classes} classes with "
                         f"data.val_fraction={val_fraction}: each side needs one image per class; "
                         "raise data.limit or change data.val_fraction")
    train_idx, val_idx = train_test_split(np.arange(len(split.labels)), test_size=n_val,
                                          stratify=split.labels, random_state=seed)
    train_idx.sort()
    val_idx.sort()
    return (Split(split.images[train_idx], split.labels[train_idx]),
            Split(split.images[val_idx], split.labels[val_idx]))


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std, in pixel units (0-255)."""
    pixels = images.reshape(-1, images.shape[-1])
    return (pixels.mean(axis=0, dtype=np.float64).round(6).tolist(),
            pixels.std(axis=0, dtype=np.float64).round(6).tolist())


def prepare(archive: Path, out_dir: Path, dataset: str, label_mode: str, val_fraction: float,
            limit: int | None, seed: int, test_limit: int | None = None) -> dict:
    """Read the archive, split off validation, write arrays and meta; return the meta.
    `limit` and `test_limit` cap the training and test images (None: all), each a
    stratified, seeded subset."""
    raw = load_dataset(archive, dataset, label_mode)
    full_train = raw.train if limit is None else stratified_subset(raw.train, limit, seed, "data.limit")
    test = raw.test if test_limit is None else stratified_subset(raw.test, test_limit, seed, "data.test_limit")
    train, val = split_validation(full_train, val_fraction, seed)
    mean, std = channel_stats(train.images)
    meta = {
        "dataset": dataset,
        "label_mode": label_mode if dataset == "cifar100" else "fine",
        "class_names": raw.class_names,
        "mean": mean,
        "std": std,
        "sizes": {"train": len(train.labels), "val": len(val.labels), "test": len(test.labels)},
    }
    if raw.superclasses is not None:
        meta["superclasses"] = raw.superclasses
    splits = {"train": train, "val": val, "test": test}
    arrays = {}
    for name, split in splits.items():
        arrays[f"{name}_images"] = split.images
        arrays[f"{name}_labels"] = split.labels
    atomic.save_arrays(out_dir, arrays, meta)
    return meta


def load_split(prepared_dir: Path, name: str, mmap: bool = False) -> Split:
    """One split written by `prepare`; `mmap` avoids reading images into memory."""
    prepared_dir = Path(prepared_dir)
    mode = "r" if mmap else None
    return Split(np.load(prepared_dir / f"{name}_images.npy", mmap_mode=mode),
                 np.load(prepared_dir / f"{name}_labels.npy"))


def load_meta(prepared_dir: Path) -> dict:
    return json.loads((Path(prepared_dir) / "meta.json").read_text())
