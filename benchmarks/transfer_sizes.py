"""Frozen-backbone transfer accuracy and extraction speed per input size, on the validation split.

    python benchmarks/transfer_sizes.py [--backbone efficientnet_lite0] [--weights imagenet]
        [--sizes 64 96 128 160] [--heads logistic dense] [--mid-level] [--prepared data/prepared]

For each size: extract features of the train and val splits with the library's
extractor (as the extract_features stage does), print images/s, then fit each
head with the head section of params.yaml and print its best validation
accuracy. The test split is never touched: choose transfer.image_size here,
then `dvc repro` scores the chosen one on test. Features are kept in memory
only; needs the prepare stage's output.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as the stages run (2-3x on these CPUs)

from cifar_pipeline import params as params_lib  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128, 160])
    parser.add_argument("--heads", nargs="+", default=["logistic", "dense"],
                        choices=["logistic", "dense", "random_forest"])
    parser.add_argument("--mid-level", action="store_true", help="add the pooled mid-level features")
    parser.add_argument("--prepared", default="data/prepared")
    args = parser.parse_args()
    params = params_lib.load("params.yaml")
    head_cfg, batch = params["head"], params["transfer"]["batch_size"]

    from cifar_pipeline.backbones import build_feature_extractor
    from cifar_pipeline.features import extract
    from cifar_pipeline.head import fit_keras_head, fit_forest
    from cifar_pipeline.prepare import load_meta, load_split

    num_classes = len(load_meta(args.prepared)["class_names"])
    splits = {name: load_split(args.prepared, name, mmap=True) for name in ("train", "val")}
    rows = []
    for size in args.sizes:
        extractor = build_feature_extractor(args.backbone, size, args.weights, args.mid_level)
        features, seconds = {}, 0.0
        for name, split in splits.items():
            start = time.perf_counter()
            features[name] = extract(extractor, split.images, batch)
            seconds += time.perf_counter() - start
        images = sum(len(split.labels) for split in splits.values())
        row = {"size": size, "images_per_s": images / seconds}
        for kind in args.heads:
            with tempfile.TemporaryDirectory() as live_dir:
                data = (features["train"], splits["train"].labels, features["val"], splits["val"].labels,
                        num_classes)
                if kind == "random_forest":
                    _, history = fit_forest(*data, head_cfg["trees"], head_cfg["min_samples_leaf"],
                                            head_cfg["seed"], Path(live_dir))
                else:
                    _, history = fit_keras_head(kind, *data, head_cfg["units"], head_cfg["dropout"],
                                                 head_cfg["lr"], head_cfg["weight_decay"], head_cfg["epochs"],
                                                 head_cfg["batch_size"], head_cfg["patience"], head_cfg["seed"],
                                                 Path(live_dir), head_cfg["label_smoothing"], head_cfg["schedule"])
            row[kind] = max(history["val_accuracy"]) if kind != "random_forest" else history["val_accuracy"][-1]
        rows.append(row)
        print(f"{args.backbone} {size} px: extraction {row['images_per_s']:.0f} images/s, "
              + ", ".join(f"{kind} val {row[kind]:.2%}" for kind in args.heads), flush=True)
    print("\n| image size | extraction images/s | " + " | ".join(f"{k} (val)" for k in args.heads) + " |")
    print("|---|---|" + "---|" * len(args.heads))
    for row in rows:
        print(f"| {row['size']} | {row['images_per_s']:.0f} | "
              + " | ".join(f"{row[k]:.2%}" for k in args.heads) + " |")
    best = max(rows, key=lambda r: max(r[k] for k in args.heads))
    print(f"best on val: {best['size']} px ({max(best[k] for k in args.heads):.2%}); "
          f"{60000 / best['images_per_s'] / 60:.1f} min to extract all 60,000 images at that rate")


if __name__ == "__main__":
    main()
