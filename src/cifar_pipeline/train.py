"""Compile and fit a Keras model with DVCLive logging, early stopping, an LR schedule
and, optionally, per-epoch checkpoints from which a killed run resumes.

Shared by the scratch-CNN stage and the transfer head stage: both pick the
best epoch on the validation split (never the test split), and both refuse to
save a model whose loss went NaN.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from dvclive import Live
from dvclive.keras import DVCLiveCallback

from cifar_pipeline.checkpoints import EpochState
from cifar_pipeline.distribute import same_on_every_worker
from cifar_pipeline.errors import PipelineError
from cifar_pipeline.muon import ConvMuon
from cifar_pipeline.params import OPTIMIZERS, PRECISIONS

# Tensor cores arrived with compute capability 7.0 (Volta).
TENSOR_CORE_CAPABILITY = (7, 0)


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite."""


def cpu_has_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX-BF16),
    which oneDNN uses for bfloat16 convolutions. False where /proc/cpuinfo is missing."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def compute_policy(precision: str) -> str:
    """The Keras dtype policy for `precision`. TensorFlow puts ops on a visible GPU by
    itself but does not choose mixed precision. `auto`: on GPUs, mixed_float16 when
    every visible GPU has tensor cores (about doubles throughput there), else float32;
    on a CPU alone, mixed_bfloat16 when it has bfloat16 instructions (oneDNN's bfloat16
    convolutions trained the fast net 27% faster on this project's CPU), else float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "mixed_bfloat16" if cpu_has_bf16() else "float32"
    capabilities = [tuple(tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0)))
                    for gpu in gpus]
    return "mixed_float16" if all(c >= TENSOR_CORE_CAPABILITY for c in capabilities) else "float32"


class LearningRateInLogs(keras.callbacks.Callback):
    """Adds the learning rate of the next step to each epoch's logs, so DVCLive plots it,
    checkpoints keep it, and a resumed run replays it, for every schedule (Keras itself
    logs it only where ReduceLROnPlateau runs)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


def make_optimizer(name: str, lr, momentum: float, weight_decay: float, muon_lr_scale: float = 1.0,
                   muon_momentum: float = 0.6) -> keras.optimizers.Optimizer:
    """`lr` is a float or a LearningRateSchedule; weight decay is decoupled (AdamW-style).
    `muon`: SGD as `sgd` but conv filters by Muon (muon.ConvMuon), at `muon_lr_scale` times
    the learning rate with their own `muon_momentum`."""
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=momentum, nesterov=momentum > 0,
                                    weight_decay=weight_decay or None)
    if name == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=weight_decay)
    if name == "muon":
        return ConvMuon(lr, filter_lr_scale=muon_lr_scale, filter_momentum=muon_momentum, momentum=momentum,
                        weight_decay=weight_decay or None)
    raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")


def learning_rate(schedule: str, lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: float):
    """`cosine`: linear warm-up to `lr`, then cosine decay to 0 at the last step.
    `plateau`: a constant `lr` that ReduceLROnPlateau lowers when validation stalls."""
    if schedule == "plateau":
        return lr
    total = epochs * steps_per_epoch
    warmup = min(int(warmup_epochs * steps_per_epoch), total - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=lr / 10 if warmup else lr, decay_steps=max(total - warmup, 1),
        alpha=0.0, warmup_target=lr if warmup else None, warmup_steps=warmup)


def fit(model: keras.Model, train_data, val_data, *, steps_per_epoch: int | None, epochs: int,
        optimizer: keras.optimizers.Optimizer, label_smoothing: float, schedule: str, patience: int,
        live_dir: Path, images_per_epoch: int, continue_log: bool = False,
        checkpoint_dir: Path | None = None, fingerprint: str = "", chief: bool = True,
        callbacks: tuple[keras.callbacks.Callback, ...] = ()) -> dict:
    """Train `model` in place, keeping the weights of its best validation epoch (the last
    epoch's when `val_data` is None: nothing held out to choose with); return the history.

    `train_data` is a dataset, or a function of the first epoch to run that returns
    one (needed to resume: see records.training_dataset). With `checkpoint_dir`,
    the state after each epoch is saved there and a later call with the same
    `fingerprint` resumes from it (checkpoints.EpochState); remove it with
    checkpoints.remove once the model is saved. `continue_log` appends to the
    DVCLive log in `live_dir` (steps continue) instead of starting it anew. On a
    multi-worker cluster every worker calls this; only the `chief` logs, and the others
    write their checkpoints to a temporary directory, removed at the end. `callbacks` run
    first in each epoch (e.g. lookahead.Lookahead).
    """
    model.compile(optimizer=optimizer,
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
                  metrics=["accuracy"])
    # A cosine schedule runs to its end (stopping at a high learning rate would keep a
    # worse model); `patience` stops a plateau schedule once validation stalls.
    if val_data is None and schedule == "plateau":
        raise ValueError("the plateau schedule needs validation data")
    state = EpochState(checkpoint_dir, fingerprint, monitor=None if val_data is None else "val_accuracy",
                       patience=patience if schedule == "plateau" else None,
                       save_to=None if chief or checkpoint_dir is None else tempfile.mkdtemp(prefix="checkpoint-"))
    # A non-chief worker's own checkpoint directory goes whatever happens, the cross-worker check included.
    try:
        start_epoch = state.find()
        if not same_on_every_worker(start_epoch):
            raise PipelineError(f"this worker would resume after epoch {start_epoch}, others elsewhere: on a cluster, "
                                f"{checkpoint_dir} must be storage that every worker shares (or absent on all)")
        state.restore(model)
        rate_in_logs = LearningRateInLogs()
        callbacks = [*callbacks, keras.callbacks.TerminateOnNaN(), rate_in_logs, state]
        live = None
        if chief:
            live = Live(str(live_dir), resume=continue_log, report=None, save_dvc_exp=False, dvcyaml=None)
            logger = DVCLiveCallback(live=live)
            for epoch, logged in enumerate(state.epochs):  # replay the resumed epochs into the fresh log
                _log_epoch_time(live, logged["seconds"])
                logger.on_epoch_end(epoch, {key: value for key, value in logged.items() if key != "seconds"})
            callbacks += [keras.callbacks.LambdaCallback(on_epoch_end=lambda *_: _log_epoch_time(
                live, state.epochs[-1]["seconds"])), logger]
        if schedule == "plateau":
            # Its patience count restarts after a resume; the learning rate it set is restored.
            # Before LearningRateInLogs, which then logs the rate it set.
            callbacks.insert(callbacks.index(rate_in_logs), keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=0.5, patience=max(1, patience // 3), min_lr=1e-6))
        if start_epoch < epochs and not state.stopped_early():
            data = train_data(start_epoch) if callable(train_data) else train_data
            model.fit(data, validation_data=val_data, initial_epoch=start_epoch, epochs=epochs,
                      steps_per_epoch=steps_per_epoch, callbacks=callbacks, verbose=2,
                      shuffle=False)  # the datasets shuffle themselves
        else:  # it had finished when it was killed: only the best weights to restore
            state.set_model(model)
            state.on_train_end()
            if live is not None:
                live.end()
    finally:
        _remove_throwaway(state)
    history = state.history()
    losses = history.get("loss", []) + history.get("val_loss", [])
    if not losses or not all(math.isfinite(v) for v in losses):
        if chief:  # DVCLive wrote a summary each epoch; none may look like a finished run's.
            (Path(live_dir) / "metrics.json").unlink(missing_ok=True)
        raise TrainingDiverged(
            "training diverged: the loss became NaN or infinite, so no model or metrics were saved "
            f"(the epochs are logged in {live_dir}/plots); try a lower learning rate (train.lr / head.lr)")
    if live is None:
        return history
    seconds = [epoch["seconds"] for epoch in state.epochs]
    steady = seconds[1:] or seconds  # the first epoch includes graph tracing
    live.summary["train_time_s"] = round(sum(seconds), 1)
    # Epoch times are kept to 10 ms: a tiny model's epochs can all round to 0.
    live.summary["images_per_s"] = round(images_per_epoch / max(float(np.median(steady)), 0.01), 1)
    live.summary["best_epoch"] = state.best_epoch + 1
    if val_data is not None:
        live.summary["best_val_accuracy"] = round(state.best_score, 4)
    live.make_summary()
    return history


def _remove_throwaway(state: EpochState) -> None:
    if state.save_to != state.directory:  # a worker's own copy, not the chief's checkpoint
        shutil.rmtree(state.save_to, ignore_errors=True)


def _log_epoch_time(live: Live, seconds: float) -> None:
    # Epoch time includes validation; the first epoch includes graph tracing.
    live.log_metric("epoch_time_s", round(seconds, 2), plot=False)
