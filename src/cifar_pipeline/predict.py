"""`cifar-predict MODEL IMAGE...`: the top-k classes of image files under a saved model.

Images of any size and mode (RGBA, grayscale, palette) are converted to RGB
and resized to the model's 32x32 input. A file that cannot be read safely as
an image (not an image, truncated or malformed data, a decompression bomb, more
than MAX_PIXELS pixels) gets an error line naming it; the others are still
classified, and the exit status is 1 if any failed. Memory stays bounded
whatever the files claim: a file's pixel count is checked from its header
before anything is decoded, and one image is decoded at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from cifar_pipeline import cifar_names

INPUT_SIZE = 32
DEFAULT_META = Path("data/prepared/meta.json")


# 50 megapixels: more than a phone camera's photo. Decoded as RGBA such an image takes 200 MB, so
# with one conversion copy a file never costs more than about 0.5 GB, whatever its header claims.
MAX_PIXELS = 50_000_000


class UnsafeImage(ValueError):
    """A file refused before decoding: its header claims more pixels than MAX_PIXELS."""


def load_image(path: Path) -> np.ndarray:
    """A (32, 32, 3) uint8 RGB array; transparency is composited onto white. Raises
    UnsafeImage for a file whose header claims more than MAX_PIXELS pixels (a JPEG is
    first decoded at the smallest scale its codec offers), and whatever Pillow raises
    for data it cannot read."""
    with warnings.catch_warnings():
        # Pillow only warns between its own limit and twice that; here any bomb is an error.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            # JPEG decodes at 1/2, 1/4 or 1/8 scale on request (DCT scaling): far less memory and time.
            image.draft("RGB", (INPUT_SIZE, INPUT_SIZE))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise UnsafeImage(f"{width} x {height} pixels is more than the {MAX_PIXELS:,} allowed "
                                  "(a decompression bomb?)")
            image.load()
            if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
                image = image.convert("RGBA")
            elif image.mode != "RGB":
                image = image.convert("RGB")
            # Box-filter downscaling averages every source pixel, as CIFAR's own downsampling did
            # (Pillow resizes RGBA premultiplied, so transparent pixels' colours do not bleed in).
            resized = image.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BOX if min(image.size) > INPUT_SIZE
                                   else Image.Resampling.BILINEAR)
    if resized.mode == "RGBA":  # composited after resizing: 32 x 32 pixels, not the whole image
        background = Image.new("RGBA", resized.size, (255, 255, 255, 255))
        resized = Image.alpha_composite(background, resized).convert("RGB")
    return np.asarray(resized, np.uint8)


def describe_failure(err: Exception) -> str:
    """One line for the error output: why a file was not classified."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image"
    if isinstance(err, (UnsafeImage, Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"refused: {err}"
    if isinstance(err, OSError) and not err.args[1:]:  # Pillow's own OSErrors: truncated or broken data
        return f"unreadable image data: {err}"
    if isinstance(err, OSError):  # the file system's: missing, unreadable
        return err.strerror or str(err)
    return f"malformed image: {type(err).__name__}: {err}"


def class_names(meta_path: Path | None, num_classes: int, model_path: Path, exported: Path | None = None) -> list[str]:
    """The model's class names: from `meta_path` when given (it must name `num_classes`),
    else from an export's `class_names.json` (`exported`), else from the meta.json of the
    project the model lives in (`<project>/models/x.keras`) or of the working directory,
    else the official CIFAR names for that many classes, else `class <i>`."""
    if meta_path is not None:
        names = json.loads(Path(meta_path).read_text())["class_names"]
        if len(names) != num_classes:
            raise ValueError(f"{meta_path} names {len(names)} classes but the model predicts {num_classes}")
        return names
    if exported is not None and exported.is_file():
        names = json.loads(exported.read_text())
        if len(names) != num_classes:
            raise ValueError(f"{exported} names {len(names)} classes but the model predicts {num_classes}")
        return names
    for candidate in (Path(model_path).resolve().parent.parent / DEFAULT_META, DEFAULT_META):
        if candidate.is_file():
            names = json.loads(candidate.read_text())["class_names"]
            if len(names) == num_classes:  # another dataset's meta.json is not this model's
                return names
    return list(cifar_names.BY_COUNT.get(num_classes, [f"class {i}" for i in range(num_classes)]))


def saved_model_dir(path: Path) -> Path | None:
    """The SavedModel directory `path` names (it, or an export directory's `saved_model/`), or None."""
    for candidate in (path, path / "saved_model"):
        if (candidate / "saved_model.pb").is_file():
            return candidate
    return None


def load_predictor(path: Path) -> tuple[Callable[[np.ndarray], np.ndarray], int, Path | None]:
    """(images -> probabilities, number of classes, the export's class_names.json or None) for a
    `.keras` file or an exported SavedModel, which runs without this package's layers."""
    exported = saved_model_dir(path)
    if exported is None:
        from cifar_pipeline.saved_models import load_model

        model = load_model(path)
        return (lambda images: model.predict(images, verbose=0)), model.output_shape[-1], None
    from cifar_pipeline.export import saved_model_predictor

    predict, classes = saved_model_predictor(exported)
    return predict, classes, exported.parent / "class_names.json"


def top_k(probabilities: np.ndarray, names: list[str], k: int) -> list[dict]:
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"class": names[i], "probability": round(float(probabilities[i]), 4)} for i in order]


def predict_files(predict: Callable[[np.ndarray], np.ndarray], paths: list[Path], names: list[str],
                  k: int) -> list[dict]:
    """One result per path, in order: {"file", "top"} or {"file", "error"}."""
    results, images, readable = [], [], []
    for path in paths:
        try:
            images.append(load_image(path))
            readable.append(len(results))
            results.append({"file": str(path)})
        # Pillow's decoders raise many kinds of exception on hostile data (SyntaxError, struct.error,
        # EOFError, IndexError, ...), so any Exception from one file is that file's error alone.
        except Exception as err:  # noqa: BLE001
            results.append({"file": str(path), "error": describe_failure(err)})
    if images:
        probabilities = predict(np.stack(images))
        for index, row in zip(readable, probabilities):
            results[index]["top"] = top_k(row, names, k)
    return results


def format_table(results: list[dict]) -> str:
    lines = []
    for result in results:
        if "error" in result:
            continue
        guesses = "  ".join(f"{p['class']} {p['probability']:.1%}" for p in result["top"])
        lines.append(f"{result['file']}\t{guesses}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cifar-predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a .keras model saved by a training stage, or an exported "
                                                 "SavedModel (exports/<model> or its saved_model/)")
    parser.add_argument("images", type=Path, nargs="+", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--top-k", type=int, default=3, help="classes to show per image (default 3)")
    parser.add_argument("--meta", type=Path, default=None,
                        help=f"class names: a prepare stage's meta.json (default: {DEFAULT_META} of the "
                             "model's project or of the working directory, else the official CIFAR names)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    if not args.model.is_file() and saved_model_dir(args.model) is None:
        parser.error(f"{args.model}: no such model file or SavedModel directory")
    if args.meta is not None and not args.meta.is_file():
        parser.error(f"{args.meta}: no such meta.json")

    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # before TensorFlow is imported, as the stages do
    predict, num_classes, exported_names = load_predictor(args.model)
    try:
        names = class_names(args.meta, num_classes, args.model, exported_names)
    except ValueError as err:
        parser.error(str(err))
    results = predict_files(predict, args.images, names, min(args.top_k, len(names)))
    for result in results:
        if "error" in result:
            print(f"error: {result['file']}: {result['error']}", file=sys.stderr)
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 1 if any("error" in result for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
