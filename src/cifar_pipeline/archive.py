"""Read CIFAR pickles straight out of the (untrusted) tar.gz archive.

Nothing is extracted to disk: members are read into memory by name, and only
regular files with plain relative names are accepted. Pickles are loaded with
an unpickler that resolves no global except the few numpy functions needed to
rebuild a uint8 array, so a tampered pickle cannot run code.
"""
from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from cifar_pipeline.errors import PipelineError

# The largest official member (cifar-100 `train`) is about 155 MB.
MAX_MEMBER_BYTES = 256 * 2**20
MAX_TOTAL_BYTES = 512 * 2**20
MAX_MEMBERS = 64

LAYOUT = {
    "cifar10": {
        "dir": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
    },
    "cifar100": {
        "dir": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
    },
}
# A numpy array pickled by Python 2 or 3 needs exactly these globals.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class ArchiveError(PipelineError, ValueError):
    """The archive or one of its pickles is malformed, hostile or not CIFAR."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR pickle")


def safe_unpickle(data: bytes, name: str):
    """Unpickle bytes that may only hold dicts, lists, strings, numbers and numpy arrays."""
    try:
        # latin1 turns Python 2 `str` into text and keeps numpy's raw bytes intact.
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise ArchiveError(f"{name}: refused to unpickle: {err}") from None
    except Exception as err:  # a truncated or garbled pickle raises many kinds of errors
        raise ArchiveError(f"{name}: not a valid pickle ({type(err).__name__}: {err})") from None


def read_members(archive: Path, wanted: set[str]) -> dict[str, bytes]:
    """The bytes of the wanted regular-file members, checking every member's kind and name."""
    found: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for count, member in enumerate(tar, start=1):
                if count > MAX_MEMBERS:
                    raise ArchiveError(f"{archive}: more than {MAX_MEMBERS} members; not a CIFAR archive")
                _check_member(archive, member)
                if member.name not in wanted or not member.isfile():
                    continue
                if member.size > MAX_MEMBER_BYTES or total + member.size > MAX_TOTAL_BYTES:
                    raise ArchiveError(f"{archive}: member {member.name} would expand past the "
                                       f"size limit ({MAX_MEMBER_BYTES >> 20} MiB a member, "
                                       f"{MAX_TOTAL_BYTES >> 20} MiB in all)")
                total += member.size
                found[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ArchiveError(f"{archive}: cannot read the archive (truncated or corrupt?): {err}") from None
    missing = sorted(wanted - found.keys())
    if missing:
        raise ArchiveError(f"{archive}: missing members {', '.join(missing)}; is this the right dataset?")
    return found


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or member.name.startswith("\\"):
        raise ArchiveError(f"{archive}: member {member.name!r} has an unsafe path")
    if member.issym() or member.islnk():
        raise ArchiveError(f"{archive}: member {member.name!r} is a link; CIFAR archives have none")
    if not (member.isfile() or member.isdir()):
        raise ArchiveError(f"{archive}: member {member.name!r} is not a regular file")


@dataclass
class Split:
    images: np.ndarray  # (N, 32, 32, 3) uint8, RGB
    labels: np.ndarray  # (N,) int64


@dataclass
class RawDataset:
    train: Split
    test: Split
    class_names: list[str]
    # CIFAR-100 with fine labels: the superclass name of each class, for grouping in reports.
    superclasses: list[str] | None = None


def load_dataset(archive: Path, dataset: str, label_mode: str = "fine") -> RawDataset:
    """Read, check and decode the train and test splits of a CIFAR archive."""
    layout = LAYOUT[dataset]
    names = {part: [f"{layout['dir']}/{n}" for n in layout[part]] for part in ("train", "test")}
    meta_name = f"{layout['dir']}/{layout['meta']}"
    members = read_members(Path(archive), {meta_name, *names["train"], *names["test"]})

    meta = safe_unpickle(members[meta_name], meta_name)
    names_key = "label_names" if dataset == "cifar10" else f"{label_mode}_label_names"
    class_names = _field(meta, names_key, meta_name)
    if not (isinstance(class_names, list) and class_names and all(isinstance(c, str) for c in class_names)):
        raise ArchiveError(f"{meta_name}: {names_key} must be a non-empty list of strings")
    labels_key = "labels" if dataset == "cifar10" else f"{label_mode}_labels"

    def decode(batch_names):
        parts = [_decode_batch(safe_unpickle(members[n], n), n, labels_key, len(class_names))
                 for n in batch_names]
        return Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))

    train, test = decode(names["train"]), decode(names["test"])
    superclasses = None
    if dataset == "cifar100" and label_mode == "fine":  # after decode: the batch's labels are checked by then
        superclasses = _superclasses(meta, meta_name, members[names["train"][0]], names["train"][0], class_names)
    return RawDataset(train=train, test=test, class_names=class_names, superclasses=superclasses)


def _superclasses(meta, meta_name: str, raw_batch: bytes, batch_name: str, class_names: list[str]) -> list[str]:
    """The coarse label name of each fine class, read off the training batch's label pairs."""
    coarse_names = _field(meta, "coarse_label_names", meta_name)
    batch = safe_unpickle(raw_batch, batch_name)
    pairs = set(zip(_field(batch, "fine_labels", batch_name), _field(batch, "coarse_labels", batch_name)))
    coarse_of = dict(pairs)
    if len(coarse_of) != len(pairs):
        raise ArchiveError(f"{batch_name}: a fine label appears under more than one coarse label")
    try:
        return [coarse_names[coarse_of[i]] for i in range(len(class_names))]
    except (KeyError, IndexError, TypeError):
        raise ArchiveError(f"{batch_name}: fine_labels and coarse_labels do not map each of the "
                           f"{len(class_names)} classes to one of {len(coarse_names)} superclasses") from None


def _field(batch, key: str, name: str):
    if not isinstance(batch, dict) or key not in batch:
        raise ArchiveError(f"{name}: expected a dict with key {key!r}")
    return batch[key]


def _decode_batch(batch, name: str, labels_key: str, num_classes: int) -> Split:
    data = _field(batch, "data", name)
    labels = _field(batch, labels_key, name)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise ArchiveError(f"{name}: data must be a uint8 numpy array, got {kind}")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ArchiveError(f"{name}: data must have shape (N, 3072), got {data.shape}")
    if not isinstance(labels, list) or not all(type(v) is int for v in labels):
        raise ArchiveError(f"{name}: {labels_key} must be a list of integers")
    if len(labels) != len(data):
        raise ArchiveError(f"{name}: {len(labels)} labels for {len(data)} images")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ArchiveError(f"{name}: labels must lie in [0, {num_classes - 1}], "
                           f"found {labels.min()}..{labels.max()}")
    # Rows hold the red plane, then green, then blue (channels first).
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return Split(np.ascontiguousarray(images), labels)
