"""Killed training resumes from its last finished epoch and ends as an uninterrupted run;
`train.deterministic` reruns give identical results; a checkpoint never outlives its settings."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from cifar_pipeline import checkpoints, saved_models
from stage_runs import epochs_saved, finish

PROJECT = Path(__file__).resolve().parents[1]
EPOCHS = 6


@pytest.fixture(scope="module")
def data(training_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    for name in ("prepared", "records"):
        (root / name).symlink_to(training_data / name)
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    # Validated, so the resumed run must also restore the best epoch's weights and the validation log.
    # Muon: its filter buffers must resume too, and its other variables keep SGD's. Lookahead: its
    # slow average must restart from the restored weights as the uninterrupted run continues it
    # (batch 14: 17 steps an epoch, so an epoch does not end on lookahead's 5-step grid). Width 16:
    # what is checked does not depend on it, and it is a 25th of the convolution work of 80.
    params["train"].update(epochs=EPOCHS, batch_size=14, fast_width=16, patience=EPOCHS, warmup_epochs=1,
                           precision="float32", deterministic=True, fit_on="train", optimizer="muon", lookahead=0.9)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _start(data: Path, out: Path, params: Path | None = None) -> subprocess.Popen:
    command = [sys.executable, str(PROJECT / "stages" / "train.py"), "--params", str(params or data / "params.yaml"),
               "--records", str(data / "records"), "--prepared", str(data / "prepared"),
               "--model", str(out / "scratch.keras"), "--live-dir", str(out / "live"),
               "--curves-png", str(out / "curves.png"), "--checkpoint-dir", str(out / "checkpoint")]
    return subprocess.Popen(command, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def _outcome(out: Path):
    weights = saved_models.load_model(out / "scratch.keras").get_weights()
    summary = json.loads((out / "live" / "metrics.json").read_text())
    logged = (out / "live" / "plots" / "metrics" / "eval" / "accuracy.tsv").read_text()
    timings = ("train_time_s", "images_per_s", "epoch_time_s")
    return weights, {k: v for k, v in summary.items() if k not in timings}, logged


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    finish(_start(data, out))
    assert not (out / "checkpoint").exists()  # removed once the model is saved
    return _outcome(out)


def test_killed_training_resumes_and_ends_as_an_uninterrupted_run(data, uninterrupted, tmp_path):
    process = _start(data, tmp_path)
    deadline = time.monotonic() + 300
    while epochs_saved(tmp_path / "checkpoint") < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # mid-epoch: the next one is under way
    process.wait()
    killed_after = epochs_saved(tmp_path / "checkpoint")
    assert 2 <= killed_after < EPOCHS and not (tmp_path / "scratch.keras").exists()

    output = finish(_start(data, tmp_path))
    assert f"resuming after epoch {killed_after}" in output
    weights, summary, logged = _outcome(tmp_path)
    expected_weights, expected_summary, expected_logged = uninterrupted
    assert summary == expected_summary and summary["step"] == EPOCHS - 1
    assert logged == expected_logged  # the DVCLive log holds every epoch, once
    for got, expected in zip(weights, expected_weights):
        np.testing.assert_array_equal(got, expected)


def test_deterministic_reruns_are_identical(data, uninterrupted, tmp_path):
    finish(_start(data, tmp_path))
    weights, summary, logged = _outcome(tmp_path)
    assert (summary, logged) == uninterrupted[1:]
    for got, expected in zip(weights, uninterrupted[0]):
        np.testing.assert_array_equal(got, expected)


def _tiny_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    model.optimizer.build(model.trainable_variables)
    return model


def test_checkpoint_of_other_settings_is_not_resumed_and_a_diverged_epoch_is_not_saved(tmp_path):
    model = _tiny_model()
    state = checkpoints.EpochState(tmp_path, "settings-a", monitor="val_accuracy", patience=5)
    state.set_model(model)
    for epoch, accuracy in enumerate((0.5, 0.6, math.nan)):
        state.on_epoch_begin(epoch)
        state.on_epoch_end(epoch, {"loss": math.nan if math.isnan(accuracy) else 1.0, "val_accuracy": accuracy})
    assert epochs_saved(tmp_path) == 2  # the NaN epoch left the last good checkpoint in place
    assert checkpoints.EpochState(tmp_path, "settings-a", "val_accuracy", 5).find() == 2
    assert checkpoints.EpochState(tmp_path, "settings-b", "val_accuracy", 5).find() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-1.weights.h5", "state.json"]
    checkpoints.remove(tmp_path)
    assert not tmp_path.exists()


def test_a_diverging_learning_rate_stops_the_stage_with_advice_and_writes_no_model_or_metrics(data, tmp_path):
    params = yaml.safe_load((data / "params.yaml").read_text())
    # A dense net has no BatchNorm to keep its weights' scale in check: at this rate, with heavy momentum
    # and no weight decay to shrink them, they overflow.
    params["train"].update(arch="ann", optimizer="sgd", lr=10.0, momentum=0.99, weight_decay=0.0, warmup_epochs=0,
                           deterministic=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    process = _start(data, tmp_path, params=tmp_path / "params.yaml")
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 1
    assert "training diverged: the loss became NaN or infinite" in output and "train.lr" in output
    assert "Traceback" not in output
    assert not (tmp_path / "scratch.keras").exists() and not (tmp_path / "curves.png").exists()
    assert not (tmp_path / "live" / "metrics.json").exists()
