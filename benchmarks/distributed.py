"""Training throughput of the default model on one device, on two logical CPU devices
(MirroredStrategy) and on a two-worker cluster on 127.0.0.1 (MultiWorkerMirroredStrategy).

    python benchmarks/distributed.py [--prepared data/prepared] [--images 12800] [--epochs 3]

On a CPU machine this measures what splitting costs, not what a second machine
gains: the replicas and workers share the same cores (each worker gets
`cores / 2` threads). Each setting trains `train` of params.yaml (model, batch,
precision) in its own process on the first `--images` training images, written
to temporary shards; the speed is DVCLive's images/s (median epoch after the
first, which includes tracing). Needs the output of the prepare stage.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]

SINGLE_PROCESS = """
import os, sys
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as the stages run; before TensorFlow starts
import tensorflow as tf
if sys.argv[1] == "mirrored":  # split the CPU before TensorFlow starts
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import runpy
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _small_records(prepared: Path, out: Path, images: int, shards: int) -> None:
    from cifar_pipeline import records
    from cifar_pipeline.prepare import load_split

    out.mkdir(parents=True)
    sizes = {}
    for split, count in (("train", images), ("val", None)):
        data = load_split(prepared, split)
        records.write_shards(out, split, data.images[:count], data.labels[:count], shards)
        sizes[split] = len(data.labels[:count])
    (out / "info.json").write_text(json.dumps({"sizes": sizes, "copies": 0, "num_classes": 10}))


def _stage(params: Path, records: Path, prepared: Path, out: Path) -> list[str]:
    return [str(PROJECT / "stages" / "train.py"), "--params", str(params), "--records", str(records),
            "--prepared", str(prepared), "--model", str(out / "m.keras"), "--live-dir", str(out / "live"),
            "--curves-png", str(out / "c.png"), "--checkpoint-dir", str(out / "ck")]


def _images_per_s(out: Path) -> float:
    return json.loads((out / "live" / "metrics.json").read_text())["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--images", type=int, default=12800)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(PROJECT / "src"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _small_records(args.prepared.resolve(), root / "records", args.images, shards=4)
        for name, strategy in (("one device", "auto"), ("MirroredStrategy, 2 logical CPUs", "mirrored"),
                               ("2 workers on 127.0.0.1", "multi_worker")):
            params = yaml.safe_load((PROJECT / "params.yaml").read_text())
            params["train"].update(epochs=args.epochs, strategy=strategy)
            (root / f"{strategy}.yaml").write_text(yaml.safe_dump(params))
            out = root / strategy
            if strategy != "multi_worker":
                subprocess.run([sys.executable, "-c", SINGLE_PROCESS, strategy,
                                *_stage(root / f"{strategy}.yaml", root / "records", args.prepared, out)],
                               env=env, check=True, capture_output=True)
            else:
                ports = []
                for _ in range(2):
                    with socket.socket() as s:
                        s.bind(("127.0.0.1", 0))
                        ports.append(s.getsockname()[1])
                threads = str(max(1, (os.cpu_count() or 2) // 2))
                out.mkdir()
                logs = [open(out / f"worker{i}.log", "w") for i in range(2)]
                workers = [subprocess.Popen(
                    [sys.executable, *_stage(root / f"{strategy}.yaml", root / "records", args.prepared,
                                             out / f"w{i}")],
                    env={**env, "TF_NUM_INTRAOP_THREADS": threads, "TF_CONFIG": json.dumps(
                        {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                         "task": {"type": "worker", "index": i}})},
                    stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
                failed = [i for i, worker in enumerate(workers) if worker.wait()]
                for log in logs:
                    log.close()
                if failed:
                    raise SystemExit((out / f"worker{failed[0]}.log").read_text()[-3000:])
                out = out / "w0"
            results[name] = _images_per_s(out)
            print(f"{name}: {results[name]:.0f} images/s", flush=True)
    base = results["one device"]
    for name, speed in results.items():
        print(f"  {name}: {speed / base:.2f}x one device")


if __name__ == "__main__":
    main()
