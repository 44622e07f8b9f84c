"""Training and input throughput of the default model, naive vs. this project's way, side by side.

    python benchmarks/throughput.py [--records data/records] [--prepared data/prepared] [--repeats 2]

Each setting runs in its own subprocess (oneDNN is fixed at TensorFlow import),
alternating, so both see the same machine load:
- naive: Keras defaults, `model.fit` on in-memory numpy arrays, oneDNN off;
- project: oneDNN on, `train.precision` (auto: mixed bfloat16 on CPUs with
  bfloat16 instructions), batches from the TFRecord shards through `tf.data`.
Also prints how fast the shards alone are read and decoded, and the time one
training epoch takes each way. The model, batch size and online augmentation
are those of `train` in params.yaml. Needs the outputs of the prepare and
augment stages (`dvc repro augment`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cifar_pipeline import params as params_lib

WARMUP_STEPS, STEPS = 5, 40


def train_params(arch: str | None = None) -> dict:
    cfg = params_lib.load("params.yaml")["train"]  # validated, as the stages read it
    return {**cfg, "arch": arch or cfg["arch"]}


def measure(mode: str, records: str, prepared: str, arch: str | None) -> float:
    """Training images/s of the default model (or `arch`) over STEPS steps, after warm-up."""
    import keras
    import numpy as np

    from cifar_pipeline import records as rec
    from cifar_pipeline.models import build_model
    from cifar_pipeline.prepare import load_meta, load_split
    from cifar_pipeline.train import compute_policy

    cfg = train_params(arch)
    batch = cfg["batch_size"]
    if mode == "project":
        keras.mixed_precision.set_global_policy(compute_policy(cfg["precision"]))
    meta = load_meta(prepared)
    model = build_model(cfg["arch"], len(meta["class_names"]), meta["mean"], meta["std"],
                        sample_images=load_split(prepared, "train", mmap=True).images[:1000])
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True), "categorical_crossentropy")
    if mode == "naive":
        train = load_split(prepared, "train")
        x = train.images[: batch * (WARMUP_STEPS + STEPS)]
        y = np.eye(len(meta["class_names"]))[train.labels[: len(x)]]
        model.fit(x[: batch * WARMUP_STEPS], y[: batch * WARMUP_STEPS], batch_size=batch, verbose=0)
        start = time.perf_counter()
        model.fit(x[batch * WARMUP_STEPS:], y[batch * WARMUP_STEPS:], batch_size=batch, verbose=0)
    else:
        data = rec.training_dataset(records, batch, len(meta["class_names"]), 0,
                                    cfg["online_flip"], cfg["online_shift_px"],
                                    cfg["online_cutout_px"], meta["mean"])
        model.fit(data, steps_per_epoch=WARMUP_STEPS, verbose=0)
        start = time.perf_counter()
        model.fit(data, steps_per_epoch=STEPS, verbose=0)
    return batch * STEPS / (time.perf_counter() - start)


def read_throughput(records: str, prepared: str, batches: int = 400) -> float:
    """Images/s of reading, decoding and online-augmenting the shards, no model."""
    from cifar_pipeline import records as rec
    from cifar_pipeline.prepare import load_meta

    cfg = train_params()
    batch = cfg["batch_size"]
    meta = load_meta(prepared)
    data = rec.training_dataset(records, batch, len(meta["class_names"]), 0, cfg["online_flip"],
                                cfg["online_shift_px"], cfg["online_cutout_px"], meta["mean"])
    for _ in data.take(batches):  # first pass fills the in-memory cache
        pass
    start = time.perf_counter()
    for _ in data.take(batches):
        pass
    return batch * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", default="data/records")
    parser.add_argument("--prepared", default="data/prepared")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--arch", help="another train.arch than params.yaml's")
    parser.add_argument("--child", choices=["naive", "project", "read"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        value = (read_throughput(args.records, args.prepared) if args.child == "read"
                 else measure(args.child, args.records, args.prepared, args.arch))
        print(json.dumps({"images_per_s": value}))
        return
    results: dict[str, list[float]] = {"naive": [], "project": [], "read": []}
    onednn = {"naive": "0", "project": "1", "read": "1"}
    for _ in range(args.repeats):
        for mode in results:
            env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn[mode], "TF_CPP_MIN_LOG_LEVEL": "3"}
            command = [sys.executable, __file__, "--child", mode, "--records", args.records,
                       "--prepared", args.prepared] + (["--arch", args.arch] if args.arch else [])
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"])
    best = {mode: max(values) for mode, values in results.items()}
    for mode, values in results.items():
        print(f"{mode:8s} images/s: " + ", ".join(f"{v:.0f}" for v in values) + f"  (best {best[mode]:.0f})")
    print(f"project / naive training throughput: {best['project'] / best['naive']:.2f}x")
    print(f"TFRecord read / project training throughput: {best['read'] / best['project']:.1f}x")
    cfg = train_params(args.arch)
    # info.json read directly: the parent process never imports TensorFlow.
    train_size = json.loads((Path(args.records) / "info.json").read_text())["sizes"]["train"]
    per_epoch = train_size // cfg["batch_size"] * cfg["batch_size"]
    print(f"one epoch ({per_epoch} images, {cfg['arch']}, batch {cfg['batch_size']}): "
          f"naive {per_epoch / best['naive']:.0f} s, project {per_epoch / best['project']:.0f} s; "
          f"{cfg['epochs']} epochs: project {cfg['epochs'] * per_epoch / best['project'] / 60:.1f} min")


if __name__ == "__main__":
    main()
