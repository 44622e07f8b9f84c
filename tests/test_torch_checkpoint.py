"""Reading legacy PyTorch state dicts without torch, and refusing anything but tensors."""
import collections
import io
import pickle
import sys
import types

import numpy as np
import pytest

from cifar_pipeline.torch_checkpoint import (LEGACY_MAGIC, LEGACY_PROTOCOL, CheckpointError,
                                             load_legacy_state_dict)


class _Storage:
    def __init__(self, key):
        self.key = key


class _Tensor:
    def __init__(self, key, offset, shape, strides):
        self.key, self.offset, self.shape, self.strides = key, offset, shape, strides


@pytest.fixture
def fake_torch(monkeypatch):
    """Just enough of a `torch` module for pickle to name its globals as torch.save does."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while writing")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in ("FloatStorage", "LongStorage"):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def _legacy_bytes(torch, state: dict, storages: dict, main_payload=None) -> bytes:
    """A file laid out as torch.save wrote it before PyTorch 1.6."""
    storage_types = {np.dtype(np.float32): torch.FloatStorage, np.dtype(np.int64): torch.LongStorage}

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                data = storages[obj.key]
                return ("storage", storage_types[data.dtype], obj.key, "cpu", data.size, None)
            return None

        def reducer_override(self, obj):
            if isinstance(obj, _Tensor):
                return (sys.modules["torch._utils"]._rebuild_tensor_v2,
                        (_Storage(obj.key), obj.offset, obj.shape, obj.strides, False, collections.OrderedDict()))
            return NotImplemented

    out = io.BytesIO()
    for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"protocol_version": LEGACY_PROTOCOL, "little_endian": True}):
        pickle.dump(header, out, protocol=2)
    if main_payload is None:
        Pickler(out, protocol=2).dump(collections.OrderedDict(state))
    else:
        out.write(main_payload)
    pickle.dump(list(storages), out, protocol=2)
    for data in storages.values():
        out.write(np.int64(data.size).tobytes())
        out.write(data.astype(data.dtype.newbyteorder("<")).tobytes())
    return out.getvalue()


def test_reads_tensors_with_offsets_strides_and_shared_storage(fake_torch, tmp_path):
    flat = np.arange(20, dtype=np.float32)
    storages = {"0": flat, "1": np.array([7], np.int64)}
    state = {
        "conv.weight": _Tensor("0", 0, (2, 3), (3, 1)),
        "conv.weight_t": _Tensor("0", 0, (3, 2), (1, 3)),  # a transposed view of the same storage
        "bn.bias": _Tensor("0", 12, (4,), (1,)),
        "bn.num_batches_tracked": _Tensor("1", 0, (), ()),
    }
    path = tmp_path / "legacy.pth"
    path.write_bytes(_legacy_bytes(fake_torch, state, storages))
    loaded = load_legacy_state_dict(path)
    np.testing.assert_array_equal(loaded["conv.weight"], flat[:6].reshape(2, 3))
    np.testing.assert_array_equal(loaded["conv.weight_t"], flat[:6].reshape(2, 3).T)
    np.testing.assert_array_equal(loaded["bn.bias"], [12, 13, 14, 15])
    assert loaded["bn.num_batches_tracked"].dtype == np.int64 and loaded["bn.num_batches_tracked"] == 7


def test_refuses_a_pickle_that_would_run_code(fake_torch, tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    path = tmp_path / "evil.pth"
    path.write_bytes(_legacy_bytes(fake_torch, {}, {}, main_payload=pickle.dumps({"w": Exploit()}, protocol=2)))
    with pytest.raises(CheckpointError, match=r"refusing to load (__builtin__|builtins)\.exec"):
        load_legacy_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", pickle.dumps({"a": 1})])
def test_rejects_files_that_are_not_legacy_checkpoints(tmp_path, content):
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a legacy PyTorch checkpoint"):
        load_legacy_state_dict(path)


def test_truncated_storage_is_reported(fake_torch, tmp_path):
    path = tmp_path / "cut.pth"
    data = _legacy_bytes(fake_torch, {"w": _Tensor("0", 0, (4,), (1,))}, {"0": np.ones(4, np.float32)})
    path.write_bytes(data[:-3])
    with pytest.raises(CheckpointError, match="truncated"):
        load_legacy_state_dict(path)
