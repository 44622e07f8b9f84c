"""Training speed of the fast net per width (`train.fast_width`), side by side, to compare widths at
equal training time.

    python benchmarks/width_speed.py [--widths 64 72 80] [--rounds 10] [--records data/records]
        [--prepared data/prepared]

One process builds the `train` model of params.yaml once per width and trains the widths in turn,
one burst each per round, the project's way (oneDNN, `train.precision`, batches from the TFRecord
shards, as in throughput.py), so every width sees the same machine load. Prints each burst's
images/s, each width's median, its median step-time ratio to the first width (per round, the figure
to trust on a noisy machine), and the epochs it gets in the time of `train.epochs` of the first
width. The models are timed with plain SGD (as in throughput.py), whatever `train.optimizer` is.
Needs the outputs of the prepare and augment stages.
"""
from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as the stages run (2-3x on these CPUs)

from throughput import _trainer, cpu_summary, train_params  # noqa: E402  (benchmarks/ is on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 72, 80])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--records", default="data/records")
    parser.add_argument("--prepared", default="data/prepared")
    args = parser.parse_args()

    timers = {width: _trainer("project", args.records, args.prepared, None, width) for width in args.widths}
    import keras  # imported by _trainer; the policy it set is the one every width trains in

    print(f"machine: {cpu_summary()}; {os.cpu_count()} logical CPUs; training dtypes: "
          f"{keras.mixed_precision.global_policy().name}", flush=True)
    speeds: dict[int, list[float]] = {width: [] for width in args.widths}
    for round_ in range(args.rounds):
        # Rotate who goes first, so each width leads in turn (the cyclic order stays the same).
        order = args.widths[round_ % len(args.widths):] + args.widths[:round_ % len(args.widths)]
        for width in order:
            speeds[width].append(timers[width]())
        print(f"round {round_ + 1}: " + ", ".join(f"{w} wide {speeds[w][-1]:.0f}" for w in args.widths)
              + " images/s", flush=True)
    base, epochs = args.widths[0], train_params()["epochs"]
    for width in args.widths:
        ratios = [b / s for b, s in zip(speeds[base], speeds[width])]  # per round: the same machine load
        ratio = statistics.median(ratios)
        print(f"width {width}: median {statistics.median(speeds[width]):.0f} images/s; step time x{ratio:.3f} "
              f"of width {base} (per round: min x{min(ratios):.3f}, max x{max(ratios):.3f}); "
              f"{epochs / ratio:.1f} epochs in the time of {epochs} at width {base}")


if __name__ == "__main__":
    main()
