"""Train a CNN from scratch on the cached TFRecords and save it as `.keras`."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cifar_pipeline import checkpoints, records
from cifar_pipeline.distribute import is_chief, make_strategy, worker_count
from cifar_pipeline.errors import PipelineError
from cifar_pipeline.keras_save import save_model
from cifar_pipeline.lookahead import Lookahead
from cifar_pipeline.models import CONVS_WITHOUT_BATCHNORM, build_model
from cifar_pipeline.prepare import load_meta, load_split
from cifar_pipeline.train import compute_policy, fit, learning_rate, make_optimizer

log = logging.getLogger(__name__)

WHITENING_SAMPLE = 5000


def train_scratch(*, records_dir: Path, prepared_dir: Path, model_path: Path, live_dir: Path,
                  checkpoint_dir: Path | None, arch: str, fast_width: int, epochs: int, batch_size: int, optimizer: str,
                  lr: float, momentum: float, weight_decay: float, muon_lr: float, muon_momentum: float,
                  lookahead: float, label_smoothing: float, schedule: str,
                  warmup_epochs: float, patience: int, online_flip: str, online_shift_px: int,
                  online_cutout_px: int, fit_on: str, precision: str, strategy: str, seed: int) -> dict | None:
    """Train `arch` (`fast_width`: models.build_model) and save the weights of its best
    validation epoch; return the Keras history (None on a cluster's workers other than the
    chief, which write nothing). `fit_on` "train+val" trains on the validation images too,
    once settings are chosen: with no held-out images left, nothing is validated and the
    last epoch's weights are saved. A run killed after an epoch resumes from
    `checkpoint_dir` when called again with the same arguments, model and data (sizes,
    channel statistics, class names). `strategy` (distribute.STRATEGIES) spreads each batch
    of `batch_size` images over devices or machines. `lookahead` > 0: the peak decay of
    lookahead.Lookahead (0: off)."""
    arguments = dict(locals())  # first, so it holds exactly the arguments
    if optimizer == "muon" and arch in CONVS_WITHOUT_BATCHNORM:
        raise PipelineError(f"train.optimizer=muon rescales each conv kernel to a fixed norm, harmless only "
                            f"where BatchNorm follows the conv; {arch} has convs without it: use sgd or adamw")
    distribution = make_strategy(strategy)
    replicas, workers = distribution.num_replicas_in_sync, worker_count(distribution)
    meta = load_meta(prepared_dir)
    num_classes = len(meta["class_names"])
    records_info = records.read_info(records_dir)
    splits = records.fit_splits(fit_on)
    if "val" in splits and schedule == "plateau":
        raise PipelineError("train.schedule=plateau lowers the learning rate when validation stalls: "
                            "it needs train.fit_on=train (use the cosine schedule with train+val)")
    if batch_size % replicas:
        raise PipelineError(f"train.batch_size={batch_size} does not split evenly over {replicas} replicas")
    # Every worker takes the same number of steps, each with batch_size / workers of its own records.
    sizes = records.fit_shard_sizes(records_dir, splits)
    steps = min(sum(records.worker_shards(sizes, w, workers)) for w in range(workers)) * workers // batch_size
    if steps == 0:
        raise PipelineError(f"train.batch_size={batch_size} exceeds the {sum(sizes)} training records"
                            + (f" ({workers} workers)" if workers > 1 else ""))
    policy = compute_policy(precision)
    keras.mixed_precision.set_global_policy(policy)
    log.info(f"train: {arch} in {policy}" + (f" on {replicas} replicas" if replicas > 1 else ""))
    # A few thousand images estimate the 12x12 patch covariance of a whitening stem well.
    sample = np.asarray(load_split(prepared_dir, "train", mmap=True).images[:WHITENING_SAMPLE])

    def training_batches(start_epoch: int):
        def for_worker(context: tf.distribute.InputContext):
            # One pipeline per worker; its batches go to the worker's replicas in turn.
            per_replica = context.get_per_replica_batch_size(batch_size)
            local_replicas = context.num_replicas_in_sync // context.num_input_pipelines
            return records.training_dataset(
                records_dir, per_replica, num_classes, seed, online_flip, online_shift_px, online_cutout_px,
                cutout_fill=meta["mean"], start_epoch=start_epoch, worker=context.input_pipeline_id,
                workers=context.num_input_pipelines, batches_per_epoch=steps * local_replicas, splits=splits)
        return distribution.distribute_datasets_from_function(for_worker)

    chief = is_chief(distribution)
    val_data = None if "val" in splits else _replicated(
        records.eval_dataset(records_dir, "val", max(batch_size, 256), num_classes))
    with distribution.scope():
        model = build_model(arch, num_classes, meta["mean"], meta["std"], sample_images=sample,
                            fast_width=fast_width)
        # The device and worker counts too: they decide each replica's batch and each worker's shards.
        settings = checkpoints.fingerprint(arguments, policy, model.to_json(), meta, records_info, replicas, workers)
        history = fit(
            model, training_batches, val_data, steps_per_epoch=steps, epochs=epochs,
            optimizer=make_optimizer(optimizer, learning_rate(schedule, lr, epochs, steps, warmup_epochs),
                                     momentum, weight_decay, muon_lr_scale=muon_lr / lr, muon_momentum=muon_momentum),
            label_smoothing=label_smoothing, schedule=schedule, patience=patience, live_dir=live_dir,
            images_per_epoch=steps * batch_size, checkpoint_dir=checkpoint_dir, fingerprint=settings, chief=chief,
            callbacks=(Lookahead(peak=lookahead, steps_per_epoch=steps, epochs=epochs),) if lookahead else ())
    if chief:
        save_model(model, model_path)
        checkpoints.remove(checkpoint_dir)
        return history
    with tempfile.TemporaryDirectory() as throwaway:  # saving may run collective ops: all workers save
        model.save(Path(throwaway) / model_path.name)
    return None


def _replicated(dataset: tf.data.Dataset) -> tf.data.Dataset:
    # Every worker evaluates all of the (small) validation split; accuracy is the same ratio.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options)

