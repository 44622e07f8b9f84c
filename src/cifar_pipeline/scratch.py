"""Train a CNN from scratch on the cached TFRecords and save it as `.keras`."""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from cifar_pipeline import atomic, checkpoints, records
from cifar_pipeline.errors import PipelineError
from cifar_pipeline.models import build_model
from cifar_pipeline.prepare import load_meta, load_split
from cifar_pipeline.train import compute_policy, fit, learning_rate, make_optimizer

WHITENING_SAMPLE = 5000


def train_scratch(*, records_dir: Path, prepared_dir: Path, model_path: Path, live_dir: Path,
                  checkpoint_dir: Path | None, arch: str, epochs: int, batch_size: int, optimizer: str,
                  lr: float, momentum: float, weight_decay: float, label_smoothing: float, schedule: str,
                  warmup_epochs: float, patience: int, online_flip: bool, online_shift_px: int,
                  online_cutout_px: int, precision: str, seed: int) -> dict:
    """Train `arch` and save the weights of its best validation epoch; return the Keras history.
    A run killed after an epoch resumes from `checkpoint_dir` when called again with the same
    arguments, model and data (sizes, channel statistics, class names)."""
    arguments = dict(locals())  # first, so it holds exactly the arguments
    meta = load_meta(prepared_dir)
    num_classes = len(meta["class_names"])
    records_info = records.read_info(records_dir)
    train_size = records_info["sizes"]["train"]
    if batch_size > train_size:
        raise PipelineError(f"train.batch_size={batch_size} exceeds the {train_size} training records")
    steps = train_size // batch_size
    policy = compute_policy(precision)
    keras.mixed_precision.set_global_policy(policy)
    print(f"train: {arch} in {policy}")
    # A few thousand images estimate the 12x12 patch covariance of a whitening stem well.
    sample = np.asarray(load_split(prepared_dir, "train", mmap=True).images[:WHITENING_SAMPLE])
    model = build_model(arch, num_classes, meta["mean"], meta["std"], sample_images=sample)
    settings = checkpoints.fingerprint(arguments, policy, model.to_json(), meta, records_info)
    history = fit(
        model,
        lambda start_epoch: records.training_dataset(
            records_dir, batch_size, num_classes, seed, online_flip, online_shift_px, online_cutout_px,
            cutout_fill=meta["mean"], start_epoch=start_epoch),
        records.eval_dataset(records_dir, "val", max(batch_size, 256), num_classes),
        steps_per_epoch=steps, epochs=epochs,
        optimizer=make_optimizer(optimizer, learning_rate(schedule, lr, epochs, steps, warmup_epochs),
                                 momentum, weight_decay),
        label_smoothing=label_smoothing, schedule=schedule, patience=patience,
        live_dir=live_dir, images_per_epoch=steps * batch_size, checkpoint_dir=checkpoint_dir, fingerprint=settings)
    with atomic.atomic_path(model_path) as tmp:
        model.save(tmp)
    checkpoints.remove(checkpoint_dir)
    return history

