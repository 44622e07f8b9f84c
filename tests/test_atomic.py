"""Atomic outputs: an interrupted write never replaces or half-writes an output."""
import numpy as np
import pytest

from cifar_pipeline import atomic


def test_failed_write_keeps_the_previous_output_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "model.keras"
    out.write_text("previous")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(out) as tmp:
            assert tmp.suffix == ".keras" and tmp.parent == tmp_path
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert out.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]


def test_directory_outputs_appear_whole(tmp_path):
    atomic.save_arrays(tmp_path / "arrays", {"a": np.arange(3)}, meta={"k": 1})
    atomic.save_arrays(tmp_path / "arrays", {"b": np.arange(2)})
    assert sorted(p.name for p in (tmp_path / "arrays").iterdir()) == ["b.npy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arrays"]
