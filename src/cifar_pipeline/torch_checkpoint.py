"""Read a PyTorch state dict saved in the legacy (pre-1.6, non-zip) format, without torch.

The legacy format is a run of pickles: a magic number, the protocol version,
system info, the state dict itself (its tensors refer to storages by key), the
list of storage keys, then each storage's raw bytes. The unpickler here only
resolves the few globals a state dict needs; any other global (which could run
code) is refused, so reading an untrusted file executes nothing.
"""
from __future__ import annotations

import collections
import pickle
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from cifar_pipeline.errors import PipelineError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class CheckpointError(PipelineError):
    """The file is not a legacy PyTorch state dict, or it asks for code to run."""


class _StorageType(NamedTuple):
    dtype: type


class _TensorRef(NamedTuple):
    key: str
    offset: int
    shape: tuple
    strides: tuple


def _rebuild_tensor(storage_key, offset, shape, strides, *_ignored):
    # Storages are read after the pickle that holds the tensors, so tensors stay references until then.
    return _TensorRef(storage_key, offset, tuple(shape), tuple(strides))


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, storages: dict):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise CheckpointError(f"refusing to load {module}.{name}: a state dict needs only tensors")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise CheckpointError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType) or view is not None:
            raise CheckpointError(f"unsupported storage {pid!r}")
        self.storages[key] = (storage_type.dtype, int(numel))
        return key


def _read_storage(file: BinaryIO, dtype, numel: int) -> np.ndarray:
    header = np.frombuffer(file.read(8), "<i8")
    if header.size != 1 or int(header[0]) != numel:
        raise CheckpointError("truncated or corrupt storage data")
    data = file.read(numel * np.dtype(dtype).itemsize)
    if len(data) != numel * np.dtype(dtype).itemsize:
        raise CheckpointError("truncated storage data")
    return np.frombuffer(data, np.dtype(dtype).newbyteorder("<"))


def load_legacy_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a legacy `torch.save(state_dict)` file as numpy arrays, by name."""
    with open(path, "rb") as file:
        try:
            header = [pickle.load(file) for _ in range(3)]
        except Exception as err:
            raise CheckpointError(f"{path}: not a legacy PyTorch checkpoint ({err})") from None
        magic, protocol, sys_info = header
        if magic != LEGACY_MAGIC or protocol != LEGACY_PROTOCOL:
            raise CheckpointError(f"{path}: not a legacy PyTorch checkpoint (magic {magic!r})")
        if not (isinstance(sys_info, dict) and sys_info.get("little_endian", True)):
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
        storages: dict = {}
        state = _RestrictedUnpickler(file, storages).load()
        keys = pickle.load(file)
        arrays = {key: _read_storage(file, *storages[key]) for key in keys}
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    out = {}
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            continue  # e.g. metadata entries
        flat = arrays[ref.key]
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(flat[ref.offset:], ref.shape, [s * itemsize for s in ref.strides])
        out[name] = np.array(view, dtype=flat.dtype.newbyteorder("="))
    return out
