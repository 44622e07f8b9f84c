"""Compile and fit a Keras model with DVCLive logging, early stopping and an LR schedule.

Shared by the scratch-CNN stage and the transfer head stage: both pick the
best epoch on the validation split (never the test split), and both refuse to
save a model whose loss went NaN.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from dvclive import Live
from dvclive.keras import DVCLiveCallback

from cifar_pipeline.errors import PipelineError
from cifar_pipeline.params import PRECISIONS

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


def make_optimizer(name: str, lr, momentum: float, weight_decay: float) -> keras.optimizers.Optimizer:
    """`lr` is a float or a LearningRateSchedule; weight decay is decoupled (AdamW-style)."""
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=momentum, nesterov=momentum > 0,
                                    weight_decay=weight_decay or None)
    if name == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; allowed: sgd, adamw")


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


class _Timing(keras.callbacks.Callback):
    """Adds wall time and throughput to the DVCLive summary (runs before DVCLive's end)."""

    def __init__(self, live: Live, images_per_epoch: int):
        super().__init__()
        self.live, self.images_per_epoch = live, images_per_epoch
        self.epoch_times: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_times.append(time.perf_counter() - self._start)
        # Epoch time includes validation; the first epoch includes graph tracing.
        self.live.log_metric("epoch_time_s", round(self.epoch_times[-1], 2), plot=False)

    def on_train_end(self, logs=None):
        steady = self.epoch_times[1:] or self.epoch_times
        self.live.summary["train_time_s"] = round(sum(self.epoch_times), 1)
        self.live.summary["images_per_s"] = round(self.images_per_epoch / float(np.median(steady)), 1)


def fit(model: keras.Model, train_data, val_data, *, steps_per_epoch: int | None, epochs: int,
        optimizer: keras.optimizers.Optimizer, label_smoothing: float, schedule: str, patience: int,
        live_dir: Path, images_per_epoch: int, resume: bool = False) -> dict:
    """Train `model` in place, keeping the weights of its best validation epoch; return the history.
    `resume` appends to the DVCLive log in `live_dir` (steps continue) instead of starting it anew."""
    model.compile(optimizer=optimizer,
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
                  metrics=["accuracy"])
    live = Live(str(live_dir), resume=resume, report=None, save_dvc_exp=False, dvcyaml=None)
    callbacks = [
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=patience, restore_best_weights=True),
        _Timing(live, images_per_epoch),
        DVCLiveCallback(live=live),
    ]
    if schedule == "plateau":
        callbacks.insert(1, keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=0.5, patience=max(1, patience // 3), min_lr=1e-6))
    history = model.fit(train_data, validation_data=val_data, epochs=epochs,
                        steps_per_epoch=steps_per_epoch, callbacks=callbacks, verbose=2,
                        shuffle=False).history  # the datasets shuffle themselves
    losses = history.get("loss", []) + history.get("val_loss", [])
    if not losses or not all(math.isfinite(v) for v in losses):
        raise TrainingDiverged(
            "training diverged: the loss became NaN or infinite, so no model was saved; "
            "try a lower learning rate (train.lr / head.lr)")
    best = int(np.argmax(history["val_accuracy"]))
    live.summary["best_epoch"] = best + 1
    live.summary["best_val_accuracy"] = round(float(history["val_accuracy"][best]), 4)
    live.make_summary()
    return history
