"""Reading CIFAR archives: both formats decode right; hostile or broken input is refused."""
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cifar_pipeline.archive import ArchiveError, load_dataset, safe_unpickle
from synthetic import cifar10_members, py2_pickle, write_tar_gz


def test_cifar10_decodes_shapes_labels_and_channel_order(cifar10_archive, tmp_path):
    path, _ = cifar10_archive
    data = load_dataset(path, "cifar10")
    assert data.train.images.shape == (300, 32, 32, 3) and data.train.images.dtype == np.uint8
    assert data.test.images.shape == (30, 32, 32, 3)
    assert data.class_names == [f"class{i}" for i in range(10)]
    assert sorted(np.bincount(data.train.labels)) == [30] * 10
    # One hand-made image: row-major R plane, then G, then B, as in the official format.
    red_plane = np.zeros(3072, np.uint8)
    red_plane[:1024] = 200
    members = cifar10_members()
    members["cifar-10-batches-py/test_batch"] = py2_pickle({"labels": [3], "data": red_plane[None]})
    single = tmp_path / "one.tar.gz"
    write_tar_gz(single, members)
    image = load_dataset(single, "cifar10").test.images[0]
    assert (image[..., 0] == 200).all() and (image[..., 1:] == 0).all()


def test_cifar100_fine_and_coarse_labels(cifar100_archive):
    path, _ = cifar100_archive
    fine = load_dataset(path, "cifar100", "fine")
    coarse = load_dataset(path, "cifar100", "coarse")
    assert len(fine.class_names) == 100 and len(coarse.class_names) == 20
    assert fine.train.labels.max() == 99 and coarse.train.labels.max() == 19
    np.testing.assert_array_equal(coarse.train.labels, fine.train.labels % 20)
    # Fine labels carry their superclass, for reports grouped by it; coarse labels need none.
    assert fine.superclasses[:3] == ["coarse0", "coarse1", "coarse2"] and fine.superclasses[20] == "coarse0"
    assert coarse.superclasses is None


@pytest.mark.parametrize("payload", [
    b"cos\nsystem\n(S'touch {marker}'\ntR.",
    b"csubprocess\ncall\n((S'touch'\nS'{marker}'\nltR.",
    b"cbuiltins\neval\n(S'open(\"{marker}\", \"w\")'\ntR.",
    b"c__builtin__\nexec\n(S'open(\"{marker}\", \"w\")'\ntR.",
])
def test_pickles_that_run_code_are_refused_before_anything_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    with pytest.raises(ArchiveError, match="refused to unpickle: global .* is not allowed"):
        safe_unpickle(payload.replace(b"{marker}", str(marker).encode()), "data_batch_1")
    assert not marker.exists()


def _archive_with(tmp_path, add):
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        add(tar)
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_unsafe_tar_members_are_refused(tmp_path, kind):
    def add(tar):
        info = tarfile.TarInfo({"dotdot": "../escape", "absolute": "/etc/evil"}.get(kind, "cifar-10-batches-py/x"))
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
        else:
            info.size = 1
        tar.addfile(info, io.BytesIO(b"x") if info.isfile() else None)

    with pytest.raises(ArchiveError, match="unsafe path|is a link"):
        load_dataset(_archive_with(tmp_path, add), "cifar10")
    assert not Path("/etc/evil").exists() and not (tmp_path.parent / "escape").exists()


class _Zeros(io.RawIOBase):
    """A stream of zero bytes, so a huge member compresses to almost nothing (a gzip bomb)."""

    def readable(self):
        return True

    def readinto(self, buffer):
        buffer[:] = bytes(len(buffer))
        return len(buffer)


def test_gzip_bomb_is_stopped_by_the_size_limit_before_it_expands(tmp_path):
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = 300 * 2**20  # the real batch is 30 MiB
        tar.addfile(info, io.BufferedReader(_Zeros()))
    assert path.stat().st_size < 2 * 2**20
    with pytest.raises(ArchiveError, match="data_batch_1 would expand past the size limit"):
        load_dataset(path, "cifar10")


def test_truncated_archive_names_the_file(cifar10_archive, tmp_path):
    path, _ = cifar10_archive
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArchiveError, match=r"cut\.tar\.gz: cannot read the archive \(truncated or corrupt\?\)"):
        load_dataset(cut, "cifar10")


@pytest.mark.parametrize("batch,message", [
    ({"labels": [1], "data": np.zeros((1, 100), np.uint8)}, r"data must have shape \(N, 3072\), got \(1, 100\)"),
    ({"labels": [1, 2], "data": np.zeros((1, 3072), np.uint8)}, "2 labels for 1 images"),
    ({"labels": [10], "data": np.zeros((1, 3072), np.uint8)}, r"labels must lie in \[0, 9\], found 10..10"),
    ({"labels": [1], "data": "not an array"}, "data must be a uint8 numpy array, got str"),
    ({"data": np.zeros((1, 3072), np.uint8)}, "expected a dict with key 'labels'"),
])
def test_malformed_batches_name_the_member_and_the_problem(tmp_path, batch, message):
    members = cifar10_members()
    members["cifar-10-batches-py/data_batch_3"] = py2_pickle(batch)
    path = tmp_path / "bad.tar.gz"
    write_tar_gz(path, members)
    with pytest.raises(ArchiveError, match=f"cifar-10-batches-py/data_batch_3: {message}"):
        load_dataset(path, "cifar10")


def test_missing_members_suggest_the_wrong_dataset(cifar100_archive):
    path, _ = cifar100_archive
    with pytest.raises(ArchiveError, match="missing members .*right dataset"):
        load_dataset(path, "cifar10")
