"""train.strategy: MirroredStrategy over two logical CPUs follows one device's loss for the same
global batch; a real two-process MultiWorkerMirroredStrategy cluster on 127.0.0.1 trains one model,
and only its chief writes the model, logs and metrics."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from cifar_pipeline import distribute, saved_models
from cifar_pipeline.errors import PipelineError

PROJECT = Path(__file__).resolve().parents[1]

# Run in a child process: the CPU can be split into logical devices only before TensorFlow starts.
# The linear model has no BatchNorm (its statistics are per replica) and no dropout (its masks are
# per replica), so one device and two replicas compute the same steps, Lookahead's syncs
# (assignments from a callback, in cross-replica context) included. One MirroredStrategy a
# process, as in a stage: two in one process would reuse each other's collective-op keys.
MIRRORED = """
import json, logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # as a stage logs
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from cifar_pipeline import models, scratch
models.ARCHITECTURES["linear"] = lambda x, n: models._classifier(keras.layers.Flatten()(x), n)
data, out = Path(sys.argv[1]), Path(sys.argv[2])
runs = {}
for arch, strategy, epochs, lookahead in json.loads(sys.argv[3]):
    keras.utils.set_random_seed(0)
    name = f"{arch}-{strategy}"
    runs[name] = scratch.train_scratch(
        records_dir=data / "records", prepared_dir=data / "prepared", model_path=out / f"{name}.keras",
        live_dir=out / name, checkpoint_dir=None, arch=arch, fast_width=16, epochs=epochs, batch_size=32,
        optimizer="sgd", lr=0.002, momentum=0.9, weight_decay=0.0, muon_lr=0.002, muon_momentum=0.6,
        lookahead=lookahead, label_smoothing=0.0, schedule="cosine",
        warmup_epochs=0, patience=5, online_flip="none", online_shift_px=0, online_cutout_px=0, fit_on="train",
        precision="float32", strategy=strategy, seed=0)
print("RUNS " + json.dumps(runs))
"""


def _env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(PROJECT / "src")}


def _train_in_child(data: Path, out: Path, runs: list) -> tuple[dict, str]:
    result = subprocess.run([sys.executable, "-c", MIRRORED, str(data), str(out), json.dumps(runs)], env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.split("RUNS ", 1)[1]), result.stdout


def test_mirrored_over_two_logical_cpus_follows_one_device(training_data, tmp_path):
    runs, output = _train_in_child(training_data, tmp_path,
                                   [("linear", "auto", 3, 0.5), ("linear", "mirrored", 3, 0.5)])
    assert "linear in float32 on 2 replicas" in output
    one, two = runs["linear-auto"], runs["linear-mirrored"]
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-4)
    np.testing.assert_allclose(two["val_loss"], one["val_loss"], rtol=1e-4)
    assert one["loss"][-1] < one["loss"][0]
    # The fast net (fused BatchNorm, per replica) trains and saves under MirroredStrategy too.
    runs, _ = _train_in_child(training_data, tmp_path, [("fast", "mirrored", 1, 0.0)])
    assert np.isfinite(runs["fast-mirrored"]["loss"]).all()
    model = saved_models.load_model(tmp_path / "fast-mirrored.keras")
    assert model.predict(np.zeros((2, 32, 32, 3), np.uint8), verbose=0).shape == (2, 10)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_cluster(tmp_path: Path, training_data: Path, epochs: int) -> list[subprocess.Popen]:
    """Both workers of a 2-process cluster running the train stage, each in its own tmp_path/worker<i>
    with its own temporary directory tmp_path/tmp<i>."""
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["train"].update(epochs=epochs, batch_size=32, fast_width=16, warmup_epochs=0, precision="float32",
                           strategy="multi_worker")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    workers = []
    for index in range(2):
        cwd = tmp_path / f"worker{index}"
        cwd.mkdir(exist_ok=True)
        (tmp_path / f"tmp{index}").mkdir(exist_ok=True)
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        workers.append(subprocess.Popen(
            [sys.executable, str(PROJECT / "stages" / "train.py"), "--params", str(tmp_path / "params.yaml"),
             "--records", str(training_data / "records"), "--prepared", str(training_data / "prepared"),
             "--model", "scratch.keras", "--live-dir", "live", "--curves-png", "curves.png",
             "--checkpoint-dir", "checkpoint"],
            cwd=cwd, env={**_env(), "TF_CONFIG": config, "TMPDIR": str(tmp_path / f"tmp{index}")},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return workers


def test_two_worker_cluster_trains_one_model_written_by_the_chief_alone(training_data, tmp_path):
    workers = _start_cluster(tmp_path, training_data, epochs=2)
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output
    assert "worker 1 of 2" in outputs[1] and "on 2 replicas" in outputs[0]
    chief, other = tmp_path / "worker0", tmp_path / "worker1"
    assert sorted(p.name for p in chief.iterdir()) == ["curves.png", "live", "scratch.keras"]
    assert list(other.iterdir()) == []
    assert not list((tmp_path / "tmp1").glob("checkpoint-*")), "worker 1 left its own checkpoint behind"
    summary = json.loads((chief / "live" / "metrics.json").read_text())
    assert summary["step"] == 1 and np.isfinite(summary["train"]["loss"])
    model = saved_models.load_model(chief / "scratch.keras")
    assert model.predict(np.zeros((2, 32, 32, 3), np.uint8), verbose=0).shape == (2, 10)


def test_a_cluster_whose_workers_would_resume_from_different_epochs_stops(training_data, tmp_path):
    # Killed after its first epoch, the chief has a checkpoint; worker 1 saves its own to a temporary
    # directory, so here (no shared storage) it would start from epoch 0 while the chief resumes.
    workers = _start_cluster(tmp_path, training_data, epochs=50)
    state = tmp_path / "worker0" / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    while not state.exists() and time.monotonic() < deadline and workers[0].poll() is None:
        time.sleep(0.5)
    for worker in workers:
        worker.kill()
        worker.communicate()
    assert state.exists(), "the chief saved no checkpoint"
    shutil.rmtree(tmp_path / "tmp1")  # the killed worker's checkpoint there: it could not clean up
    workers = _start_cluster(tmp_path, training_data, epochs=50)
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 1, output
        assert "others elsewhere: on a cluster, checkpoint must be storage that every worker shares" in output
        assert "Traceback" not in output
    assert "resuming after epoch" in outputs[0]
    assert not (tmp_path / "worker0" / "scratch.keras").exists()
    assert not list((tmp_path / "tmp1").glob("checkpoint-*")), "the stopped worker left its checkpoint behind"


def test_multi_worker_needs_a_tf_config_naming_this_task(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(PipelineError, match="train.strategy=multi_worker needs TF_CONFIG"):
        distribute.make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker",
                                                                                       "index": 3}}))
    with pytest.raises(PipelineError, match="TF_CONFIG is not a cluster with this process's task in it"):
        distribute.make_strategy("multi_worker")
