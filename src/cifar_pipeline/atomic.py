"""Write stage outputs under a temporary name and rename them into place.

An interrupted stage then never leaves a half-written file or directory at an
output path, where DVC could mistake it for a finished output.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary sibling path; on success, replace `path` with it.

    Works for a file or a directory written at the yielded path. The suffix is
    kept (Keras insists that a model's file name ends in `.keras`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    _remove(tmp)
    try:
        yield tmp
        _remove(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _json_text(data) -> str:
    """Sorted keys, so equal data always gives equal bytes."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_json(path: str | Path, data) -> None:
    """Deterministic JSON, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(_json_text(data))


def save_arrays(directory: str | Path, arrays: dict[str, np.ndarray], meta: dict | None = None) -> None:
    """Save arrays as `.npy` files (and `meta` as meta.json) into one directory, atomically.

    `.npy` rather than `.npz`: zip archives stamp the current time, which would
    change the bytes (and DVC's hash) of identical data on every run.
    """
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        if meta is not None:
            (tmp / "meta.json").write_text(_json_text(meta))
