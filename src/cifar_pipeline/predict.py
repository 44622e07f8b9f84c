"""`cifar-predict MODEL IMAGE...`: the top-k classes of image files under a saved model.

Images of any size and mode (RGBA, grayscale, palette) are converted to RGB
and resized to the model's 32x32 input. A file that cannot be read as an
image gets an error line naming it; the others are still classified, and the
exit status is 1 if any failed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cifar_pipeline import cifar_names

INPUT_SIZE = 32
DEFAULT_META = Path("data/prepared/meta.json")


def load_image(path: Path) -> np.ndarray:
    """A (32, 32, 3) uint8 RGB array; transparency is composited onto white."""
    with Image.open(path) as image:
        image.load()
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        rgb = image.convert("RGB")
        # Box-filter downscaling averages every source pixel, as CIFAR's own downsampling did.
        resized = rgb.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BOX if min(rgb.size) > INPUT_SIZE
                             else Image.Resampling.BILINEAR)
    return np.asarray(resized, np.uint8)


def class_names(meta_path: Path | None, num_classes: int, model_path: Path) -> list[str]:
    """The model's class names: from `meta_path` when given (it must name `num_classes`),
    else from the meta.json of the project the model lives in (`<project>/models/x.keras`)
    or of the working directory, else the official CIFAR names for that many classes,
    else `class <i>`."""
    if meta_path is not None:
        names = json.loads(Path(meta_path).read_text())["class_names"]
        if len(names) != num_classes:
            raise ValueError(f"{meta_path} names {len(names)} classes but the model predicts {num_classes}")
        return names
    for candidate in (Path(model_path).resolve().parent.parent / DEFAULT_META, DEFAULT_META):
        if candidate.is_file():
            names = json.loads(candidate.read_text())["class_names"]
            if len(names) == num_classes:  # another dataset's meta.json is not this model's
                return names
    return list(cifar_names.BY_COUNT.get(num_classes, [f"class {i}" for i in range(num_classes)]))


def top_k(probabilities: np.ndarray, names: list[str], k: int) -> list[dict]:
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"class": names[i], "probability": round(float(probabilities[i]), 4)} for i in order]


def predict_files(model, paths: list[Path], names: list[str], k: int) -> list[dict]:
    """One result per path, in order: {"file", "top"} or {"file", "error"}."""
    results, images, readable = [], [], []
    for path in paths:
        try:
            images.append(load_image(path))
            readable.append(len(results))
            results.append({"file": str(path)})
        except (OSError, UnidentifiedImageError, ValueError) as err:
            reason = "not an image" if isinstance(err, UnidentifiedImageError) else str(err)
            results.append({"file": str(path), "error": reason})
    if images:
        probabilities = model.predict(np.stack(images), verbose=0)
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
    parser.add_argument("model", type=Path, help="a .keras model saved by the train or train_head stage")
    parser.add_argument("images", type=Path, nargs="+", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--top-k", type=int, default=3, help="classes to show per image (default 3)")
    parser.add_argument("--meta", type=Path, default=None,
                        help=f"class names: a prepare stage's meta.json (default: {DEFAULT_META} of the "
                             "model's project or of the working directory, else the official CIFAR names)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    if not args.model.is_file():
        parser.error(f"{args.model}: no such model file")
    if args.meta is not None and not args.meta.is_file():
        parser.error(f"{args.meta}: no such meta.json")

    from cifar_pipeline.saved_models import load_model

    model = load_model(args.model)
    try:
        names = class_names(args.meta, model.output_shape[-1], args.model)
    except ValueError as err:
        parser.error(str(err))
    results = predict_files(model, args.images, names, min(args.top_k, len(names)))
    for result in results:
        if "error" in result:
            print(f"error: {result['file']}: {result['error']}", file=sys.stderr)
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 1 if any("error" in result for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
