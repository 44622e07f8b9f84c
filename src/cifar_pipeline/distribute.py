"""Which devices and machines train a model: a `tf.distribute` strategy from `train.strategy`.

- auto: all visible GPUs with MirroredStrategy when there are several, else the
  default strategy (one device: the GPU, or the CPU with all its cores).
- mirrored: MirroredStrategy over all visible GPUs, or over all logical CPU
  devices when there is no GPU (one, unless a test splits the CPU in two).
- multi_worker: MultiWorkerMirroredStrategy over the cluster that TF_CONFIG
  describes (one process per machine, each started with its own TF_CONFIG).

`train.batch_size` is the global batch: each step, every replica takes
batch_size / replicas images, so the learning rate and schedule in params.yaml
hold for any number of devices.
"""
from __future__ import annotations

import json
import logging
import os

import tensorflow as tf

from cifar_pipeline.errors import PipelineError
from cifar_pipeline.params import STRATEGIES

log = logging.getLogger(__name__)


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The strategy `name` asks for. multi_worker must be made before any other
    TensorFlow work in the process (it starts the collective-ops server)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; allowed: {', '.join(STRATEGIES)}")
    if name == "multi_worker":  # before anything that starts TensorFlow's runtime
        config = _tf_config_cluster()
        processes = sum(len(config["cluster"].get(job, [])) for job in ("chief", "worker"))
        log.info(f"train: {config['task']['type']} {config['task']['index']} of {processes} processes")
        return _MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    devices = gpus or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([device.name for device in devices])


class _MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """What Keras 3's `fit` asks of `reduce` on a cluster (keras-team/keras#20585): a whole
    first batch of (images, labels) at once, for its shapes, where this strategy's own
    `reduce` takes one value, of a float or int32/int64 type (not uint8 images); and
    each step's scalar loss and metrics along axis 0, which a scalar lacks. This reduces
    a nest value by value, integer types the collective ops lack in int32, scalars whole."""

    def reduce(self, reduce_op, value, axis):
        parent = super()

        def one(value):
            local = self.experimental_local_results(value)[0]
            along = axis if local.shape.rank else None  # a scalar has no axis 0
            if local.dtype in (tf.int32, tf.int64) or local.dtype.is_floating:
                return parent.reduce(reduce_op, value, along)
            widened = self.run(tf.cast, args=(value, tf.int32))
            return tf.cast(parent.reduce(reduce_op, widened, along), local.dtype)
        return tf.nest.map_structure(one, value)


def _tf_config_cluster() -> dict:
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise PipelineError("train.strategy=multi_worker needs TF_CONFIG in the environment: "
                            '{"cluster": {"worker": ["host1:port", ...]}, "task": {"type": "worker", "index": 0}}')
    try:
        config = json.loads(text)
        task = config["task"]
        if task["type"] not in config["cluster"] or not 0 <= task["index"] < len(config["cluster"][task["type"]]):
            raise KeyError("task")
    except (ValueError, KeyError, TypeError) as err:
        raise PipelineError(f"TF_CONFIG is not a cluster with this process's task in it ({err}): {text}") from err
    return config


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the model, logs and checkpoints: always, except on a
    multi-worker cluster, where only the chief (or worker 0 when none is named chief) does."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return not has_chief and resolver.task_type == "worker" and resolver.task_id == 0


def worker_count(strategy: tf.distribute.Strategy) -> int:
    """Processes (chief and workers) that each run an input pipeline: 1 off a cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return 1
    jobs = resolver.cluster_spec().as_dict()
    return max(1, len(jobs.get("chief", [])) + len(jobs.get("worker", [])))


def same_on_every_worker(value: int) -> bool:
    """Whether every worker of the current strategy's cluster holds the same integer `value`
    (sums of 1, v and v**2 agree only then); always true off a cluster."""
    strategy = tf.distribute.get_strategy()
    if worker_count(strategy) == 1:
        return True
    count, total, squares = (float(strategy.reduce("SUM", tf.constant(x, tf.float64), axis=None))
                             for x in (1.0, float(value), float(value) ** 2))
    return count * squares == total * total
