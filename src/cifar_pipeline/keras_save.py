"""Save a Keras model as a `.keras` file, atomically, with bytes that depend on the model alone.

Keras writes two things into the archive that change from one save to the next:
the time of saving (metadata.json's `date_saved`, the weights file's zip date)
and, in config.json, each shared object's `shared_object_id`, which is its
Python `id()`: a memory address. DVC hashes bytes, so a stage re-run that
computes the same model would otherwise look changed and re-run every stage
downstream of it.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

from cifar_pipeline import atomic

# The zip format's earliest date, given to every member.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def save_model(model, path: str | Path) -> None:
    """Write `model` (a keras.Model) to `path`, ending in `.keras`."""
    with atomic.atomic_path(path) as tmp:
        model.save(tmp)
        with zipfile.ZipFile(tmp) as saved:
            members = [(info, saved.read(info)) for info in saved.infolist()]
        with zipfile.ZipFile(tmp, "w") as timeless:
            for info, data in members:
                if info.filename == "metadata.json":
                    metadata = json.loads(data)
                    metadata.pop("date_saved", None)
                    data = json.dumps(metadata).encode()
                elif info.filename == "config.json":
                    data = json.dumps(_renumber_shared_objects(json.loads(data), {})).encode()
                member = zipfile.ZipInfo(info.filename, date_time=_ZIP_EPOCH)
                member.compress_type, member.external_attr = info.compress_type, info.external_attr
                timeless.writestr(member, data)


def _renumber_shared_objects(config, numbers: dict):
    """`config` with each distinct `shared_object_id` replaced by its rank of first appearance:
    loading only matches equal ids to one another, so the sharing is kept."""
    if isinstance(config, list):
        return [_renumber_shared_objects(item, numbers) for item in config]
    if not isinstance(config, dict):
        return config
    renumbered = {}
    for key, value in config.items():
        if key == "shared_object_id":
            renumbered[key] = numbers.setdefault(value, len(numbers) + 1)
        else:
            renumbered[key] = _renumber_shared_objects(value, numbers)
    return renumbered
