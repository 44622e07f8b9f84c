"""Training speed of fine-tuning per input size and number of trained layers, side by side: the
transfer model (frozen-BatchNorm EfficientNet-Lite0 with mid-level features + dense head) with
every backbone layer, or the top N, trainable, as a CPU would fine-tune it, to choose
`transfer.image_size` and `finetune.layers` by cost.

    python benchmarks/finetune_speed.py [--sizes 96 128 160] [--layers all 40] [--batch 128] [--rounds 4]
        [--steps 6] [--precision auto] [--jit-compile] [--prepared data/prepared]

One process builds one model per size and `finetune.layers` value (in `--precision`'s dtype policy,
as `train.precision`; `--jit-compile`: compiled with XLA), then trains them in turn, `--steps`
steps each per round on the same real training images (random flips), so every model sees the
same machine load; a burst is timed after its first step. Prints each model's images/s per round
and median, and the minutes an epoch of 45,000 images would take.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as the stages run (2-3x on these CPUs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 160])
    parser.add_argument("--layers", nargs="+", default=["all"],
                        help="finetune.layers values: all, or the top N layers with weights")
    parser.add_argument("--jit-compile", action="store_true", help="compile the training step with XLA")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--precision", default="auto", help="as train.precision: auto | float32 | mixed_bfloat16")
    parser.add_argument("--prepared", default="data/prepared")
    args = parser.parse_args()

    import keras
    import numpy as np

    from cifar_pipeline.backbones import build_feature_extractor
    from cifar_pipeline.features import transfer_model
    from cifar_pipeline.finetune import unfreeze
    from cifar_pipeline.head import build_head
    from cifar_pipeline.prepare import load_split
    from cifar_pipeline.train import compute_policy

    policy = compute_policy(args.precision)
    keras.config.set_dtype_policy(policy)
    train = load_split(args.prepared, "train")
    images, labels = train.images, train.labels
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(args.steps):
        pick = rng.choice(len(labels), args.batch, replace=False)
        x = images[pick].copy()
        flip = rng.random(args.batch) < 0.5
        x[flip] = x[flip][:, :, ::-1]
        batches.append((x, keras.utils.to_categorical(labels[pick], 10)))
    models = {}
    for size in args.sizes:
        for layers in args.layers:
            extractor = build_feature_extractor("efficientnet_lite0", size, "imagenet", mid_level=True)
            dim = extractor.output_shape[-1]
            model = transfer_model(extractor, build_head("dense", np.zeros(dim), np.ones(dim), 10, 1024, 0.6))
            unfreeze(model, layers if layers == "all" else int(layers))  # BatchNorm stays in inference mode
            model.compile(optimizer=keras.optimizers.AdamW(1e-4), loss="categorical_crossentropy",
                          jit_compile=args.jit_compile)
            model.train_on_batch(*batches[0])  # trace
            models[f"{size} px, layers {layers}"] = model
    print(f"dtype policy {policy}; batch {args.batch}; XLA {args.jit_compile}; trainable weights: "
          + ", ".join(f"{name} {len(m.trainable_weights)}" for name, m in models.items()))
    speeds = {name: [] for name in models}
    for round_ in range(args.rounds):
        for name, model in models.items():
            model.train_on_batch(*batches[0])
            start = time.perf_counter()
            for x, y in batches[1:]:
                model.train_on_batch(x, y)
            speeds[name].append((len(batches) - 1) * args.batch / (time.perf_counter() - start))
        print(f"round {round_ + 1}: " + ", ".join(f"{name} {speeds[name][-1]:.0f}" for name in models)
              + " images/s", flush=True)
    for name in models:
        median = statistics.median(speeds[name])
        print(f"{name}: median {median:.0f} images/s (min {min(speeds[name]):.0f}, max {max(speeds[name]):.0f}); "
              f"an epoch of 45,000 images {45000 / median / 60:.1f} min")


if __name__ == "__main__":
    main()
