"""cifar-predict on hostile image files: each one that cannot be read safely gets one error line
naming it, the others are still classified, and memory stays bounded whatever the files claim."""
import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from cifar_pipeline.models import build_model
from cifar_pipeline.predict import MAX_PIXELS, load_image, main


def png(width: int, height: int, color_type: int = 6, rows: bytes | None = None) -> bytes:
    """A PNG of `width` x `height` 8-bit pixels (color type 6: RGBA, 0: grey) whose image data is
    `rows` (compressed) or, by default, all zeros: compressed row by row, so a huge image costs
    little memory to make and almost nothing on disk (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if rows is None:
        channels = {0: 1, 2: 3, 6: 4}[color_type]
        compressor, parts = zlib.compressobj(9), []
        row = bytes(1 + width * channels)  # filter byte 0 + the row's pixels
        for _ in range(height):
            parts.append(compressor.compress(row))
        rows = b"".join(parts) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A valid 64 x 64 JPEG whose frame header is rewritten to claim `width` x `height`."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    good = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(good).save(root / "good.png")
    whole = (root / "good.png").read_bytes()
    bad_crc = bytearray(whole)
    bad_crc[20] ^= 0xFF  # inside IHDR: its checksum no longer matches
    made = {
        # Valid image data, tiny on disk: 13,000^2 RGBA pixels would be 676 MB decoded.
        "bomb.png": png(13_000, 13_000),
        # Under Pillow's own limit (89 M pixels) but over ours.
        "big.png": png(8_000, 8_000, color_type=0),
        # Claims 3.6 G pixels; the data are a few bytes.
        "huge_header.png": png(60_000, 60_000, rows=zlib.compress(b"\0" * 100)),
        "huge_header.jpg": jpeg_claiming(65_000, 65_000),
        "truncated.png": whole[:len(whole) // 2],
        "bad_checksum.png": bytes(bad_crc),
        "garbage_after_signature.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "empty.jpg": b"",
    }
    for name, data in made.items():
        (root / name).write_bytes(data)
    return root, good


REFUSED = ("bomb.png", "big.png", "huge_header.png", "huge_header.jpg")
UNREADABLE = ("truncated.png", "bad_checksum.png", "garbage_after_signature.png", "empty.jpg")


def test_every_hostile_file_gets_one_error_line_and_the_good_ones_are_classified(files, tmp_path, capsys):
    root, _ = files
    model = build_model("ann", 10, mean=[120.0] * 3, std=[60.0] * 3)
    model.save(tmp_path / "model.keras")
    names = ["good.png", *REFUSED, *UNREADABLE, "good.png"]
    status = main([str(tmp_path / "model.keras"), *(str(root / name) for name in names), "--json"])
    out, err = capsys.readouterr()
    assert status == 1
    results = json.loads(out)
    assert [r["file"] for r in results] == [str(root / name) for name in names]
    assert "top" in results[0] and "top" in results[-1]
    for result in results[1:-1]:
        assert "error" in result and "top" not in result, result
    for name in REFUSED:
        assert f"error: {root / name}: refused:" in err
    lines = err.strip().splitlines()
    assert len(lines) == len(REFUSED) + len(UNREADABLE)
    assert all(line.startswith("error: ") for line in lines)


def test_the_pixel_limit_is_checked_before_decoding(files):
    root, _ = files
    for name in REFUSED:
        with pytest.raises(Exception, match="allowed|exceeds|decompression bomb"):
            load_image(root / name)
    assert 8_000 * 8_000 > MAX_PIXELS


def test_memory_stays_bounded_whatever_the_files_claim(files):
    """In a process that may use 1 GB of address space at most, every hostile file is refused
    (not a MemoryError) and the good image after them still loads."""
    root, good = files
    script = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from cifar_pipeline.predict import load_image, describe_failure\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "for name in sys.argv[2:]:\n"
        "    try:\n"
        "        print(name, load_image(Path(sys.argv[1]) / name).sum())\n"
        "    except Exception as err:\n"
        "        print(name, 'error', describe_failure(err))\n"
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script, str(root), *REFUSED, *UNREADABLE, "good.png"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    for name, line in zip(REFUSED, lines):
        assert line.startswith(f"{name} error refused:"), line
    for name, line in zip(UNREADABLE, lines[len(REFUSED):]):
        assert line.startswith(f"{name} error ") and "MemoryError" not in line, line
    assert lines[-1] == f"good.png {load_image(root / 'good.png').sum()}"


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_and_still_classified(tmp_path):
    photo = np.zeros((4000, 3000, 3), np.uint8)
    photo[:, :1500] = (200, 30, 30)
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=90)
    image = load_image(tmp_path / "photo.jpg")
    assert image.shape == (32, 32, 3)
    assert abs(int(image[16, 2, 0]) - 200) <= 6 and abs(int(image[16, 29, 0])) <= 6
