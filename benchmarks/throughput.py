"""Training and input throughput of the default model, naive vs. this project's way, side by side.

    python benchmarks/throughput.py [--records data/records] [--prepared data/prepared] [--rounds 10]
        [--deterministic]

Two long-lived worker processes (oneDNN is fixed at TensorFlow import) build
the model once each, then train in short bursts, taking turns, so each pair of
bursts sees the same machine load; this machine's speed changes by factors of
two from one minute to the next, so the per-round ratio is the figure to trust:
- naive: Keras defaults, `model.fit` on in-memory numpy arrays, oneDNN off;
- project: oneDNN on, `train.precision` (auto: mixed bfloat16 on CPUs with
  bfloat16 instructions), batches from the TFRecord shards through `tf.data`.
A burst's speed is timed between its first and last batch, which leaves out
`fit`'s set-up in both. A third worker reads and decodes the shards alone
(with the online augmentation), and the time of one training epoch each way
is derived. `--deterministic` adds a worker that trains the project's way with
TensorFlow op determinism (`train.deterministic: true`). The model, batch size
and online augmentation are those of `train` in params.yaml. Needs the outputs
of the prepare and augment stages.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cifar_pipeline import params as params_lib

BURST_STEPS, READ_BATCHES = 12, 200
RESULT = "RESULT "  # marks the worker's answers among anything else written to stdout


def train_params(arch: str | None = None, fast_width: int | None = None) -> dict:
    cfg = params_lib.load("params.yaml")["train"]  # validated, as the stages read it
    return {**cfg, "arch": arch or cfg["arch"], "fast_width": fast_width or cfg["fast_width"]}


def _trainer(mode: str, records: str, prepared: str, arch: str | None, fast_width: int | None = None):
    """Build the model and its data once; return a function that trains one burst and gives images/s."""
    import keras
    import numpy as np

    from cifar_pipeline import records as rec
    from cifar_pipeline.models import build_model
    from cifar_pipeline.prepare import load_meta, load_split
    from cifar_pipeline.train import compute_policy

    cfg = train_params(arch, fast_width)
    batch = cfg["batch_size"]
    if mode == "deterministic":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    if mode != "naive":
        keras.mixed_precision.set_global_policy(compute_policy(cfg["precision"]))
    meta = load_meta(prepared)
    model = build_model(cfg["arch"], len(meta["class_names"]), meta["mean"], meta["std"],
                        sample_images=load_split(prepared, "train", mmap=True).images[:1000],
                        fast_width=cfg["fast_width"])
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True), "categorical_crossentropy")
    ends: list[float] = []
    clock = keras.callbacks.LambdaCallback(on_train_batch_end=lambda *_, **__: ends.append(time.perf_counter()))
    if mode == "naive":
        train = load_split(prepared, "train")
        x = train.images[: batch * BURST_STEPS]
        y = np.eye(len(meta["class_names"]))[train.labels[: len(x)]]

        def burst():
            model.fit(x, y, batch_size=batch, verbose=0, callbacks=[clock])
    else:
        data = rec.training_dataset(records, batch, len(meta["class_names"]), 0, cfg["online_flip"],
                                    cfg["online_shift_px"], cfg["online_cutout_px"], meta["mean"])

        def burst():
            model.fit(data, steps_per_epoch=BURST_STEPS, verbose=0, callbacks=[clock])

    def timed() -> float:
        ends.clear()
        burst()
        return batch * (len(ends) - 1) / (ends[-1] - ends[0])

    timed()  # warm-up: traces the graph, fills the caches
    return timed


def _reader(records: str, prepared: str):
    """A function that reads, decodes and online-augments READ_BATCHES batches and gives images/s."""
    from cifar_pipeline import records as rec
    from cifar_pipeline.prepare import load_meta

    cfg = train_params()
    meta = load_meta(prepared)
    data = rec.training_dataset(records, cfg["batch_size"], len(meta["class_names"]), 0, cfg["online_flip"],
                                cfg["online_shift_px"], cfg["online_cutout_px"], meta["mean"])

    def timed() -> float:
        # A fresh iterator each burst: one kept between bursts would prefetch while it waits, and
        # the burst would time draining that buffer. The clock starts after the first batch.
        batches = iter(data)
        next(batches)
        start = time.perf_counter()
        for _ in range(READ_BATCHES):
            next(batches)
        return cfg["batch_size"] * READ_BATCHES / (time.perf_counter() - start)

    timed()  # warm-up
    return timed


def worker(mode: str, records: str, prepared: str, arch: str | None) -> None:
    """Build once, then answer each line on stdin with one burst's images/s."""
    timed = _reader(records, prepared) if mode == "read" else _trainer(mode, records, prepared, arch)
    import keras

    print(RESULT + keras.mixed_precision.global_policy().name, flush=True)  # ready; the dtypes it trains in
    for _ in sys.stdin:
        print(RESULT + json.dumps(timed()), flush=True)


def cpu_summary(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name and which of the vector instruction sets that decide these figures it has."""
    try:
        first_cpu = Path(cpuinfo).read_text().split("\n\n")[0]
    except OSError:
        return "unknown CPU (no /proc/cpuinfo)"
    field = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first_cpu.splitlines())}
    flags = set(field.get("flags", "").split())
    isa = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
    return f"{field.get('model name', 'unknown CPU')} (family {field.get('cpu family', '?')}, model " \
           f"{field.get('model', '?')}), {' '.join(isa) or 'no AVX2'}"


def _answer(process: subprocess.Popen) -> str:
    for line in process.stdout:
        if line.startswith(RESULT):
            return line[len(RESULT):].strip()
    raise RuntimeError(f"benchmark worker exited with {process.wait()}; run it alone to see its error")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", default="data/records")
    parser.add_argument("--prepared", default="data/prepared")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--arch", help="another train.arch than params.yaml's")
    parser.add_argument("--deterministic", action="store_true",
                        help="also time the project's way with train.deterministic (TensorFlow op determinism)")
    parser.add_argument("--worker", choices=["naive", "project", "read", "deterministic"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.records, args.prepared, args.arch)
        return
    onednn = {"naive": "0", "project": "1", "read": "1", **({"deterministic": "1"} if args.deterministic else {})}
    workers, policies = {}, {}
    for mode in onednn:
        env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn[mode], "TF_CPP_MIN_LOG_LEVEL": "3"}
        command = [sys.executable, __file__, "--worker", mode, "--records", args.records,
                   "--prepared", args.prepared] + (["--arch", args.arch] if args.arch else [])
        workers[mode] = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)
        # Built and warmed up before the next one starts, so set-ups do not overlap.
        policies[mode] = _answer(workers[mode])
    # The figures depend on the CPU's vector instructions (bfloat16 ones above all), so name them.
    print(f"machine: {cpu_summary()}; {os.cpu_count()} logical CPUs; training dtypes: "
          + ", ".join(f"{mode} {policies[mode]}" for mode in policies if mode != "read"), flush=True)
    results: dict[str, list[float]] = {mode: [] for mode in workers}
    for round_ in range(args.rounds):
        # Alternate who goes first, so neither always follows the other.
        for mode in sorted(workers, key=lambda m: (m != "naive") ^ (round_ % 2 == 1)):
            workers[mode].stdin.write("run\n")
            workers[mode].stdin.flush()
            results[mode].append(float(_answer(workers[mode])))
        print(f"round {round_ + 1}: " + ", ".join(f"{mode} {values[-1]:.0f}" for mode, values in results.items())
              + " images/s", flush=True)
    for process in workers.values():
        process.stdin.close()
        process.wait()
    ratios = [p / n for p, n in zip(results["project"], results["naive"])]
    median = {mode: statistics.median(values) for mode, values in results.items()}
    for mode, values in results.items():
        print(f"{mode:8s} images/s: median {median[mode]:.0f}, min {min(values):.0f}, max {max(values):.0f}")
    print("project / naive training throughput, per round: " + ", ".join(f"{r:.2f}" for r in ratios))
    print(f"  median {statistics.median(ratios):.2f}x, min {min(ratios):.2f}x, max {max(ratios):.2f}x")
    print(f"TFRecord read / project training throughput (medians): {median['read'] / median['project']:.1f}x")
    if args.deterministic:
        slowdown = [d / p for d, p in zip(results["deterministic"], results["project"])]
        print("deterministic / project, per round: " + ", ".join(f"{r:.2f}" for r in slowdown)
              + f"; median {statistics.median(slowdown):.2f}")
    cfg = train_params(args.arch)
    # info.json read directly: the parent process never imports TensorFlow.
    sizes = json.loads((Path(args.records) / "info.json").read_text())["sizes"]
    # An epoch of the train stage covers every split that train.fit_on names (records.fit_splits).
    per_epoch = sum(sizes[split] for split in cfg["fit_on"].split("+")) // cfg["batch_size"] * cfg["batch_size"]
    print(f"one epoch ({per_epoch} images, {cfg['arch']}, batch {cfg['batch_size']}, medians): "
          f"naive {per_epoch / median['naive']:.0f} s, project {per_epoch / median['project']:.0f} s; "
          f"{cfg['epochs']} epochs: project {cfg['epochs'] * per_epoch / median['project'] / 60:.1f} min")


if __name__ == "__main__":
    main()
