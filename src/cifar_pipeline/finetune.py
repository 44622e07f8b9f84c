"""Fine-tune the top layers of the backbone together with a converged head, on images.

Runs after the head has trained on cached features, so the new layers start
from a good head instead of pushing random gradients into the backbone. This
is the one transfer step that needs the backbone's forward and backward pass on
every image each epoch: minutes per epoch on a CPU, hence off by default.
"""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from cifar_pipeline.errors import PipelineError
from cifar_pipeline.train import fit, make_optimizer


def unfreeze_top(model: keras.Model, count: int) -> list[str]:
    """Make the last `count` weighted layers of the backbone inside `model` trainable, and
    nothing else of it; return their names. BatchNormalization layers stay frozen, which
    in Keras also keeps them in inference mode: small fine-tuning batches would otherwise
    overwrite the ImageNet statistics."""
    backbone = _backbone(model)
    weighted = [layer for layer in backbone.layers
                if layer.weights and not isinstance(layer, layers.BatchNormalization)]
    if count > len(weighted):
        raise PipelineError(f"transfer.fine_tune_layers = {count}, but the backbone {backbone.name} has "
                            f"{len(weighted)} layers with weights (BatchNormalization not counted)")
    backbone.trainable = True
    for layer in backbone.layers:
        layer.trainable = False
    for layer in weighted[len(weighted) - count:]:
        layer.trainable = True
    return [layer.name for layer in weighted[len(weighted) - count:]]


def _backbone(model: keras.Model) -> keras.Model:
    """The innermost-but-one model: transfer model -> feature extractor -> backbone."""
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    for candidate in nested:
        inner = [layer for layer in candidate.layers if isinstance(layer, keras.Model)]
        if inner:
            return inner[0]
    raise PipelineError(f"found no backbone model inside {model.name}")


def image_dataset(images: np.ndarray, labels: np.ndarray, num_classes: int, batch_size: int,
                  shuffle_seed: int | None) -> tf.data.Dataset:
    """Batches of (uint8 images, one-hot labels); shuffled and randomly mirrored when seeded."""
    data = tf.data.Dataset.from_tensor_slices((images, tf.one_hot(labels, num_classes)))
    if shuffle_seed is not None:
        data = data.shuffle(len(labels), seed=shuffle_seed, reshuffle_each_iteration=True)
    data = data.batch(batch_size)
    if shuffle_seed is not None:
        data = data.map(lambda x, y: (tf.image.random_flip_left_right(x, seed=shuffle_seed), y),
                        num_parallel_calls=tf.data.AUTOTUNE)
    return data.prefetch(tf.data.AUTOTUNE)


def fine_tune(model: keras.Model, *, train_images: np.ndarray, train_labels: np.ndarray, val_images: np.ndarray,
              val_labels: np.ndarray, num_classes: int, layers_to_tune: int, epochs: int, lr: float,
              weight_decay: float, batch_size: int, patience: int, seed: int, live_dir: Path,
              label_smoothing: float = 0.0) -> dict:
    """Train the top `layers_to_tune` backbone layers and the head of the end-to-end `model`
    in place, continuing the head's DVCLive log; return the fine-tuning epochs' history."""
    tuned = unfreeze_top(model, layers_to_tune)
    print(f"fine-tune: {len(tuned)} backbone layers ({tuned[0]} .. {tuned[-1]}) + head, lr {lr}, {epochs} epochs")
    return fit(model,
               image_dataset(train_images, train_labels, num_classes, batch_size, shuffle_seed=seed),
               image_dataset(val_images, val_labels, num_classes, batch_size, shuffle_seed=None),
               steps_per_epoch=None, epochs=epochs, optimizer=make_optimizer("adamw", lr, 0.0, weight_decay),
               label_smoothing=label_smoothing, schedule="plateau", patience=patience, live_dir=live_dir,
               images_per_epoch=len(train_labels), continue_log=True)
